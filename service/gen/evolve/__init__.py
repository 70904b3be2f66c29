"""Generated from protos/evolve/. Do not edit."""
