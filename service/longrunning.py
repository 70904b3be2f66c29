"""The operations served as the standard google.longrunning.Operations (DESIGN §6).

Generic long-running-operation clients (google-api-core's OperationsClient
and operation futures, the stubs generated from googleapis' operations.proto,
grpcurl) then poll, wait for, list, cancel and delete evolve's searches
unchanged. The servicer is thin: each call becomes the same evolve.v1 call
(so both services share one code path, its bounds and its errors), and the
answer is repacked in the standard shape: metadata is an Any holding an
evolve.v1.OperationMetadata, the response an Any holding an
evolve.v1.TaskResult, and the error a google.rpc.Status.
"""

from __future__ import annotations

from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2
from google.rpc import status_pb2

from evolve.errors import InvalidArgumentError
from service.gen.evolve.v1 import evolve_pb2
from service.servicers import Backend, EvolutionServicer

SERVICE_NAME = "google.longrunning.Operations"
COLLECTION = "operations"  # ListOperationsRequest.name: the collection, as in operations/<id>


def standard_operation(operation: evolve_pb2.Operation) -> operations_pb2.Operation:
    """An evolve.v1 Operation in google.longrunning's shape."""
    standard = operations_pb2.Operation(name=operation.name, done=operation.done)
    standard.metadata.Pack(operation.metadata)
    result = operation.WhichOneof("result")
    if result == "error":
        error = operation.error
        standard.error.CopyFrom(status_pb2.Status(code=error.code, message=error.message, details=error.details))
    elif result == "response":
        standard.response.Pack(operation.response)
    return standard


def _check_collection(name: str) -> None:
    if name not in ("", COLLECTION):
        raise InvalidArgumentError("name", f'the operations collection is "{COLLECTION}" (or empty), got {name!r}')


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    """google.longrunning.Operations over the evolve.v1 operation handlers."""

    def __init__(self, backend: Backend):
        self._evolution = EvolutionServicer(backend)

    def GetOperation(self, request, context):
        operation = self._evolution.GetOperation(evolve_pb2.GetOperationRequest(name=request.name), context)
        return standard_operation(operation)

    def ListOperations(self, request, context):
        _check_collection(request.name)
        evolve_request = evolve_pb2.ListOperationsRequest(
            filter=request.filter, page_size=request.page_size, page_token=request.page_token
        )
        response = self._evolution.ListOperations(evolve_request, context)
        return operations_pb2.ListOperationsResponse(
            operations=[standard_operation(o) for o in response.operations],
            next_page_token=response.next_page_token,
        )

    def CancelOperation(self, request, context):
        self._evolution.CancelOperation(evolve_pb2.CancelOperationRequest(name=request.name), context)
        return empty_pb2.Empty()

    def DeleteOperation(self, request, context):
        self._evolution.DeleteOperation(evolve_pb2.DeleteOperationRequest(name=request.name), context)
        return empty_pb2.Empty()

    def WaitOperation(self, request, context):
        evolve_request = evolve_pb2.WaitOperationRequest(name=request.name)
        if request.HasField("timeout"):
            evolve_request.timeout.CopyFrom(request.timeout)
        return standard_operation(self._evolution.WaitOperation(evolve_request, context))
