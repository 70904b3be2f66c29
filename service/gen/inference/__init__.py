"""Generated from protos/inference/. Do not edit."""
