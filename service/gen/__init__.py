"""Generated gRPC / protobuf code of protos/. Do not edit.

Regenerate with `python scripts/gen_protos.py` (grpcio-tools==1.66.2).

    from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
    from service.gen.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

The inference module keeps its descriptors in a private pool so that it can
share a process with other definitions of the `inference` package (e.g.
tritonclient's); server reflection therefore needs reflection_pool().
"""

from __future__ import annotations

from google.protobuf import descriptor as _descriptor
from google.protobuf import descriptor_pool as _descriptor_pool


def reflection_pool(*files: _descriptor.FileDescriptor) -> _descriptor_pool.DescriptorPool:
    """A new descriptor pool holding `files` and, first, their dependencies.

    For server reflection over services whose descriptors live in different
    pools, e.g.

        pool = reflection_pool(evolve_pb2.DESCRIPTOR, grpc_predict_v2_pb2.DESCRIPTOR,
                               health_pb2.DESCRIPTOR)
        reflection.enable_server_reflection(names, server, pool=pool)
    """
    pool = _descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: _descriptor.FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in files:
        add(file)
    return pool
