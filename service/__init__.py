"""evolve's gRPC service: server, servicers, converters, jobs and the client.

Importing this package loads neither JAX nor gRPC; `service.server` imports
the training stack only when it starts serving.
"""
