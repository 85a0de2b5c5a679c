"""Bring your own gRPC schema: the seed's ``MyDriver`` serving ``TestService``
(``examples/protos/test_service.proto``) on fleet's gRPC port.

Run it with ``fleet run examples.grpc_test_service:my_deployment`` (or ``python -m
examples.grpc_test_service``), then ``python -m examples.grpc_test_service_client``.
``Ping`` and the class are the seed's, with its imports renamed; ``PingTimeout`` is left
to the generated servicer base, so clients get ``UNIMPLEMENTED`` as from grpcio;
``Streaming`` is added here to show a method streaming its replies.
"""

import fleet as serve
from examples.protos import test_service_pb2, test_service_pb2_grpc
from fleet.drivers import gRPCIngress


@serve.deployment(is_driver_deployment=True)
class MyDriver(test_service_pb2_grpc.TestServiceServicer, gRPCIngress):
    def __init__(self):
        super().__init__()

    async def Ping(self, request, context):  # noqa: N802 - the RPC's name
        # play with your dag and then reply
        return test_service_pb2.PingReply()

    async def Streaming(self, request, context):  # noqa: N802 - the RPC's name
        for index in range(request.count):
            yield test_service_pb2.StreamingReply(index=index)


my_deployment = MyDriver.bind()


if __name__ == "__main__":
    serve.run(my_deployment, blocking=True)
