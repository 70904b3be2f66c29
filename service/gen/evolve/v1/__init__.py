"""Generated from protos/evolve/v1/. Do not edit."""
