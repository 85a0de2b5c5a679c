"""A client of examples/grpc_fruit_market.py: prints ``(29.0,)`` for 10 oranges and
3 apples. Only the imports differ from the Ray Serve 2.1 example (and the address is a
module constant, so tests can point it at a free port)."""

import asyncio
import struct

import grpc

from fleet.generated import serve_pb2, serve_pb2_grpc

ADDRESS = "localhost:9000"


async def send_request():
    async with grpc.aio.insecure_channel(ADDRESS) as channel:
        stub = serve_pb2_grpc.PredictAPIsServiceStub(channel)
        response = await stub.Predict(
            serve_pb2.PredictRequest(
                input={"ORANGE": bytes("10", "utf-8"), "APPLE": bytes("3", "utf-8")}
            )
        )
    return response


async def main():
    resp = await send_request()
    print(struct.unpack("f", resp.prediction))


if __name__ == "__main__":
    asyncio.run(main())
