"""evolve: a continual multitask model that grows by evolutionary search.

Importing this package loads neither gRPC nor TensorFlow.
"""

__version__ = "0.1.0"
