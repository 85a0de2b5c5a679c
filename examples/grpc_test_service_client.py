"""A client of examples/grpc_test_service.py: ``Ping`` answers, ``PingTimeout`` is
``UNIMPLEMENTED`` (the servicer base's answer), ``Streaming`` streams three replies.
The seed's client, with its calls awaited inside a coroutine (``grpc.aio`` calls are
awaited) and the address a module constant, so tests can point it at a free port."""

import asyncio

import grpc

from examples.protos import test_service_pb2, test_service_pb2_grpc

ADDRESS = "localhost:9000"


async def main() -> list:
    results = []
    async with grpc.aio.insecure_channel(ADDRESS) as channel:
        stub = test_service_pb2_grpc.TestServiceStub(channel)
        response = await stub.Ping(test_service_pb2.PingRequest())
        results.append(("Ping", type(response).__name__))
        try:
            await stub.PingTimeout(test_service_pb2.PingTimeoutRequest())
        except grpc.aio.AioRpcError as exc:
            results.append(("PingTimeout", exc.code().name, exc.details()))
        indexes = [r.index async for r in stub.Streaming(
            test_service_pb2.StreamingRequest(count=3))]
        results.append(("Streaming", indexes))
    for line in results:
        print(*line)
    return results


if __name__ == "__main__":
    asyncio.run(main())
