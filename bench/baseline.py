"""The no-framework baseline: raw ASGI apps for uvicorn, a grpc.aio server and a
hand-written RPC "handle" to a worker process.

Each handler does the same work as the fleet and Ray Serve apps (see
:mod:`bench.models`), with nothing but the web server (or socket) around it.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import models

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


async def _reply(send: Send, body: str) -> None:
    """Send a 200 text/plain response."""
    data = body.encode()
    headers = [*_HEADERS, (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Answer ASGI lifespan events."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _app(body: Callable[[], Awaitable[str]]) -> ASGIApp:
    """Wrap an async handler body into a raw ASGI app."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        await _reply(send, await body())

    return app


async def _noop() -> str:
    return models.noop()


async def _cpu() -> str:
    return models.cpu_work()


async def _model_unbatched() -> str:
    return models.run_model([None])[0]


class _Batcher:
    """Collect calls into batches of up to MAX_BATCH_SIZE, waiting at most the timeout."""

    def __init__(self, run: Callable[[list[Any]], list[str]] = models.run_model) -> None:
        self.queue: asyncio.Queue[asyncio.Future[str]] | None = None
        self.run = run

    async def __call__(self) -> str:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._loop())
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await self.queue.put(fut)
        return await fut

    async def _loop(self) -> None:
        assert self.queue is not None
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + models.BATCH_WAIT_TIMEOUT_S
            while len(batch) < models.MAX_BATCH_SIZE:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            for fut, out in zip(batch, self.run(batch), strict=True):
                if not fut.done():
                    fut.set_result(out)


noop = _app(_noop)
cpu = _app(_cpu)
model_unbatched = _app(_model_unbatched)
model_batched = _app(_Batcher())


class _Mlp:
    """The real network called in-process, built on first use (in the warm-up)."""

    def __init__(self) -> None:
        self.net: models.DigitNet | None = None

    def predict(self, items: list[Any]) -> list[str]:
        if self.net is None:
            self.net = models.DigitNet()
        return self.net.predict(items)


_mlp = _Mlp()


async def _mlp_unbatched() -> str:
    return _mlp.predict([None])[0]


mlp_unbatched = _app(_mlp_unbatched)
mlp_batched = _app(_Batcher(_mlp.predict))

APPS: dict[str, ASGIApp] = {
    "noop": noop,
    "cpu": cpu,
    "model_unbatched": model_unbatched,
    "model_batched": model_batched,
    "mlp_unbatched": mlp_unbatched,
    "mlp_batched": mlp_batched,
}


class FruitMarketServicer:
    """grpc.aio servicer pricing an order directly, without any deployment hop."""

    async def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802
        from bench import predict_pb

        fruit, amount = models.parse_order(dict(request.input))
        price = models.stand_price(fruit, amount)
        return predict_pb.PredictResponse(prediction=models.encode_price(price))


class PredictServicer:
    """grpc.aio servicer answering Predict with the no-op handler (``grpcnoop``)."""

    async def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802
        from bench import predict_pb

        return predict_pb.PredictResponse(prediction=models.predict(request.input))


async def serve_grpc(port: int, ready: Callable[[], None], servicer: Any = None) -> None:
    """Serve the Predict API (FruitMarket unless servicer says otherwise) with grpc.aio
    until cancelled."""
    import grpc

    from bench import predict_pb

    server = grpc.aio.server()
    predict_pb.add_PredictAPIsServiceServicer_to_server(servicer or FruitMarketServicer(),
                                                        server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready()
    await server.wait_for_termination()


# --- a hand-written "handle": framed pickle RPC to a worker process -------------

_FRAME = struct.Struct("!IQ")  # payload length, request id


async def worker_main(port: int, ready: Callable[[], None]) -> None:
    """Worker side: answer framed calls by running the no-op handler."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size, rid = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                pickle.loads(await reader.readexactly(size))
                out = pickle.dumps(await _noop())
                writer.write(_FRAME.pack(len(out), rid) + out)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    ready()
    async with server:
        await server.serve_forever()


class RawHandle:
    """Client side of the framed RPC: many calls multiplexed on one connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """Open the connection and start reading replies."""
        reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                size, rid = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                value = pickle.loads(await reader.readexactly(size))
                fut = self.pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(value)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(exc)

    async def remote(self, *args: Any) -> Any:
        """Call the worker's handler and wait for its reply."""
        assert self.writer is not None
        self.next_id += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        data = pickle.dumps(args)
        self.writer.write(_FRAME.pack(len(data), self.next_id) + data)
        return await fut
