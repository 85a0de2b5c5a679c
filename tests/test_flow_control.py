"""Flow control end to end: a stream's producer is at most a window ahead of its
consumer, in every kind of stream (handle streams, HTTP response bodies, gRPC streams
both ways, websocket messages), and a generator that never awaits leaves the replica
free to serve other calls. Real processes, real sockets and real clients."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from helpers import wait_for
from protos import fleet_echo_pb2 as pb
from protos import fleet_echo_pb2_grpc as pb_grpc
from starlette.requests import Request
from starlette.responses import StreamingResponse
from websockets.sync.client import connect as ws_connect

import fleet
from fleet._batching import STREAM_AHEAD
from fleet._wire.flow import WINDOW_CHUNKS

SERVICER_FN = "protos.fleet_echo_pb2_grpc.add_EchoServiceServicer_to_server"
HTTP_CHUNK = 64 * 1024
GRPC_CHUNK = 16 * 1024
FLOOD_MESSAGE = 256 * 1024


@fleet.deployment(max_ongoing_requests=100)
class Producer:
    """Endless producers that never await, and counters a test reads between items."""

    def __init__(self) -> None:
        self.produced: dict[str, int] = {}

    async def count(self, key: str) -> int:
        return self.produced.get(key, 0)

    async def numbers(self, key: str) -> Any:
        n = 0
        while True:             # never awaits: only the window stops it
            n += 1
            self.produced[key] = n
            yield n

    @fleet.batch(max_batch_size=2, batch_wait_timeout_s=0)
    async def batched_numbers(self, keys: list[str]) -> Any:
        n = 0
        while True:             # never awaits: the slowest reader's queue stops it
            n += 1
            for key in keys:
                self.produced[key] = n
            yield [n] * len(keys)

    def sync_numbers(self, key: str) -> Any:
        n = 0
        while True:
            n += 1
            self.produced[key] = n
            yield n

    async def __call__(self, request: Request) -> Any:
        key = request.query_params.get("key", "")
        if not key:
            return "pong"
        chunk = b"x" * HTTP_CHUNK

        async def body() -> Any:
            try:
                while True:
                    self.produced[key] = self.produced.get(key, 0) + 1
                    yield chunk
            finally:
                self.produced[key + "-ended"] = 1
        return StreamingResponse(body())

    async def Repeat(self, request: Any, context: Any) -> Any:  # noqa: N802
        text = "y" * GRPC_CHUNK
        try:
            while True:
                self.produced[request.text] = self.produced.get(request.text, 0) + 1
                yield pb.EchoReply(text=text)
        finally:
            self.produced[request.text + "-ended"] = 1

    async def Join(self, requests: Any, context: Any) -> Any:  # noqa: N802
        async for request in requests:      # reads one message, then nothing
            self.produced[request.text[:8]] = 1
            await asyncio.sleep(3600)
        return pb.EchoReply(text="never")


ws_api = FastAPI()


@fleet.deployment(graceful_shutdown_timeout_s=1)
@fleet.ingress(ws_api)
class Sink:
    def __init__(self) -> None:
        self.read = 0
        self.open = 0
        self.go = asyncio.Event()
        self.pushed = 0

    @ws_api.websocket("/ws")
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.open += 1
        try:
            await websocket.receive_bytes()     # one message, then nothing until go
            self.read += 1
            await self.go.wait()
            while True:
                await websocket.receive_bytes()
                self.read += 1
        except WebSocketDisconnect:
            pass
        finally:
            self.open -= 1

    @ws_api.websocket("/push")
    async def push(self, websocket: WebSocket) -> None:
        await websocket.accept()
        message = b"p" * HTTP_CHUNK
        while True:                 # only the window stops it
            await websocket.send_bytes(message)
            self.pushed += 1

    async def release(self) -> None:
        self.go.set()

    async def push_count(self) -> int:
        return self.pushed

    async def reads(self) -> int:
        return self.read

    async def connections(self) -> int:
        return self.open


@pytest.fixture(scope="module")
def apps() -> Iterator[dict[str, Any]]:
    fleet.shutdown()
    fleet.start(http_options={"port": 0},
                grpc_options={"port": 0, "grpc_servicer_functions": [SERVICER_FN]})
    try:
        producer = fleet.run(Producer.bind(), name="flow", route_prefix="/flow")
        sink = fleet.run(Sink.bind(), name="sink", route_prefix="/sink")
        st = fleet.status()
        yield {"producer": producer, "sink": sink,
               "http": st["proxies"]["http"]["port"], "grpc": st["proxies"]["grpc"]["port"]}
    finally:
        fleet.shutdown()


def _stable(read: Any, polls: int = 5) -> int:
    """The value read() settles at: the same over `polls` successive reads."""
    last, same = read(), 0
    deadline = time.monotonic() + 20
    while same < polls:
        assert time.monotonic() < deadline, "the producer never stopped"
        time.sleep(0.05)
        now = read()
        same = same + 1 if now == last else 0
        last = now
    return int(last)


@pytest.mark.parametrize("method", ["numbers", "sync_numbers"])
def test_handle_stream_producer_stops_exactly_one_window_ahead(apps, method):
    producer = apps["producer"]
    key = f"handle-{method}"
    gen = getattr(producer, method).options(stream=True).remote(key)
    it = iter(gen)
    assert [next(it) for _ in range(10)] == list(range(1, 11))
    count = producer.count
    # 10 read is under half a window: no credit went back, so exactly a window went out
    wait_for(lambda: count.remote(key).result() >= WINDOW_CHUNKS)
    assert count.remote(key).result() == WINDOW_CHUNKS
    # reading 30 more passes half a window: one credit of 32, so 32 more, no more
    assert [next(it) for _ in range(30)] == list(range(11, 41))
    wait_for(lambda: count.remote(key).result() >= WINDOW_CHUNKS + 32)
    assert count.remote(key).result() == WINDOW_CHUNKS + 32
    gen.cancel()


def test_batched_stream_stops_a_bounded_way_ahead_of_its_reader(apps):
    producer = apps["producer"]
    gen = producer.batched_numbers.options(stream=True).remote("batched")
    it = iter(gen)
    assert [next(it) for _ in range(10)] == list(range(1, 11))
    produced = _stable(lambda: producer.count.remote("batched").result())
    # the reader's queue in the replica (STREAM_AHEAD), the replica's window and the
    # one item in hand: bounded, where the batch ran without end before
    assert produced <= 10 + STREAM_AHEAD + WINDOW_CHUNKS + 2
    gen.cancel()
    # with its only reader gone the batch's generator stops: the replica stays free
    _stable(lambda: producer.count.remote("batched").result())
    assert producer.count.remote("nothing").result(timeout_s=10) == 0


def test_generator_that_never_awaits_leaves_the_replica_free(apps):
    producer = apps["producer"]
    stop = threading.Event()

    def consume() -> None:
        for _ in producer.numbers.options(stream=True).remote("busy"):
            if stop.is_set():
                break

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        wait_for(lambda: producer.count.remote("busy").result() > 10 * WINDOW_CHUNKS)
        # other calls are answered while the generator runs flat out
        for _ in range(20):
            assert producer.count.remote("nothing").result(timeout_s=10) == 0
    finally:
        stop.set()
        reader.join(10)
    assert not reader.is_alive()


def test_http_client_that_reads_nothing_holds_the_replica_to_a_bounded_lead(apps):
    port = apps["http"]
    producer = apps["producer"]
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /flow?key=slow HTTP/1.1\r\nHost: x\r\n\r\n")
        produced = _stable(lambda: producer.count.remote("slow").result())
        # one window in the replica, one in the proxy, the proxy's and the kernel's
        # socket buffers: some megabytes, where an unbounded stream runs to gigabytes
        assert 0 < produced * HTTP_CHUNK < 48 * 1024 * 1024
        # other clients are served as usual meanwhile
        other = socket.create_connection(("127.0.0.1", port), timeout=10)
        with other:
            other.sendall(b"GET /flow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := other.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"pong")
    finally:
        sock.close()
    # the client is gone: the replica's generator is closed
    wait_for(lambda: producer.count.remote("slow-ended").result() == 1)


def test_grpc_reply_stream_to_a_client_that_stops_reading_is_bounded(apps):
    producer = apps["producer"]
    with grpc.insecure_channel(f"127.0.0.1:{apps['grpc']}") as channel:
        stub = pb_grpc.EchoServiceStub(channel)
        replies = stub.Repeat(pb.EchoRequest(text="grpc-out"),
                              metadata=(("application", "flow"),))
        assert len(next(replies).text) == GRPC_CHUNK
        produced = _stable(lambda: producer.count.remote("grpc-out").result())
        assert produced * GRPC_CHUNK < 48 * 1024 * 1024
        replies.cancel()
        # the client is gone: the replica's generator is closed
        wait_for(lambda: producer.count.remote("grpc-out-ended").result() == 1)


def test_grpc_request_stream_flood_waits_for_the_handler(apps):
    producer = apps["producer"]
    sent = 0
    total = 400                  # 100 MiB if nothing held the client back

    def requests() -> Iterator[Any]:
        nonlocal sent
        for i in range(total):
            sent += 1
            yield pb.EchoRequest(text=f"flood---{i}".ljust(FLOOD_MESSAGE, "z"))

    with grpc.insecure_channel(f"127.0.0.1:{apps['grpc']}") as channel:
        stub = pb_grpc.EchoServiceStub(channel)
        call = stub.Join.future(requests(), metadata=(("application", "flow"),))
        wait_for(lambda: producer.count.remote("flood---").result() == 1)
        held = _stable(lambda: sent)
        assert held * FLOOD_MESSAGE < 48 * 1024 * 1024 and held < total
        call.cancel()


def test_websocket_flood_waits_for_the_app_and_resumes_when_it_reads(apps):
    port = apps["http"]
    sink = apps["sink"]
    sent = 0
    total = 400                  # 100 MiB if nothing held the client back
    message = b"w" * FLOOD_MESSAGE
    done = threading.Event()
    # no compression: the bytes on the wire are the bytes that queue
    with ws_connect(f"ws://127.0.0.1:{port}/sink/ws", max_size=None,
                    compression=None) as ws:
        def flood() -> None:
            nonlocal sent
            for _ in range(total):
                ws.send(message)
                sent += 1
            done.set()

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        wait_for(lambda: sink.reads.remote().result() == 1)
        held = _stable(lambda: sent)
        # a window in the replica and the proxy, and the kernel's socket buffers (up
        # to tens of megabytes on loopback)
        assert held * FLOOD_MESSAGE < 64 * 1024 * 1024
        assert not done.is_set()
        sink.release.remote().result()
        # the app reads again: credit flows back and the rest of the flood goes through
        assert done.wait(30)
        wait_for(lambda: sink.reads.remote().result() == total)
        sender.join(10)
    wait_for(lambda: sink.connections.remote().result() == 0)


def test_websocket_client_that_reads_nothing_holds_the_app_to_a_bounded_lead(apps):
    sink = apps["sink"]
    with ws_connect(f"ws://127.0.0.1:{apps['http']}/sink/push", max_size=None,
                    compression=None, max_queue=1, close_timeout=0.2) as ws:
        ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert len(ws.recv()) == HTTP_CHUNK
        pushed = _stable(lambda: sink.push_count.remote().result())
        assert 0 < pushed * HTTP_CHUNK < 48 * 1024 * 1024
