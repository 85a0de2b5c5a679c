"""The HTTP proxy's direct path (HTTPProxy.start_direct): which requests the protocol
offers it, and that requests it takes behave as the ASGI way's do on a real proxy:
pipelined behind and ahead of ASGI requests, answers that are not the plain case, a
client that leaves, HTTP/1.0."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from helpers import RawClient, stderr_into, wait_for
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from uvicorn.server import ServerState

import fleet
from fleet._config import HTTPOptions
from fleet._proxy.uvicorn_protocol import HeadLimits, LimitedHttpToolsProtocol

# -- which requests the protocol offers the direct path (in memory) -------------------


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(
            name, default)

    def write(self, data: Any) -> None:
        self.out += bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol     # a websocket upgrade hands the connection over

    def resume_reading(self) -> None:
        pass


class _InFlight:
    """What start_direct leaves on the connection while its call is out."""
    response_complete = False
    more_body = False
    keep_alive = True
    disconnected = False

    def __init__(self) -> None:
        self.body = b""
        self.complete_at: int | None = None
        self.completions = 0
        self.reading = True

    def body_part(self, data: bytes) -> None:
        self.body += data

    def complete(self) -> None:
        self.complete_at = len(self.body)
        self.completions += 1
        self.reading = False

    def lost(self) -> None:
        self.disconnected = True


class _Direct:
    """Takes requests whose path starts with /take, as the proxy takes plain ones."""

    def __init__(self) -> None:
        self.offered: list[bytes] = []
        self.taken: _InFlight | None = None

    def start_direct(self, conn: Any) -> bool:
        self.offered.append(conn.url)
        if not conn.url.startswith(b"/take"):
            return False
        conn.direct_req = conn.cycle = self.taken = _InFlight()
        return True

    def finish(self, conn: Any) -> None:
        assert self.taken is not None
        self.taken.response_complete = True
        conn.direct_req = None
        conn.on_response_complete()


@pytest.fixture
def offered() -> Iterator[tuple[Any, _Direct, list[str], _Transport]]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)        # (a websocket upgrade's protocol looks it up)
    asgi: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        asgi.append(scope["path"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    config = uvicorn.Config(app, loop="none", interface="asgi3", lifespan="off",
                            ws="websockets-sansio", log_level="warning")
    direct = _Direct()
    conn = LimitedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={},
                                    _loop=loop, limits=HeadLimits(HTTPOptions(), loop),
                                    direct=direct)
    transport = _Transport()
    conn.connection_made(transport)
    try:
        yield conn, direct, asgi, transport
    finally:
        conn.connection_lost(None)
        loop.run_until_complete(asyncio.sleep(0))
        asyncio.set_event_loop(None)
        loop.close()


def _settle(conn: Any) -> None:
    conn.loop.run_until_complete(asyncio.sleep(0.01))


def test_plain_requests_are_offered_and_taken_without_a_task(offered):
    conn, direct, asgi, _ = offered
    conn.data_received(b"GET /take HTTP/1.1\r\nhost: x\r\n\r\n")
    assert direct.offered == [b"/take"] and conn.direct_req is direct.taken
    assert not conn.tasks
    direct.finish(conn)
    conn.data_received(b"GET /other HTTP/1.1\r\nhost: x\r\n\r\n")
    _settle(conn)
    assert direct.offered == [b"/take", b"/other"] and asgi == ["/other"]


def test_a_direct_request_gets_its_body_then_completes(offered):
    conn, direct, asgi, _ = offered
    conn.data_received(b"POST /take HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nab")
    assert direct.taken is not None and direct.taken.complete_at is None
    conn.data_received(b"cde")
    assert direct.taken.body == b"abcde" and direct.taken.complete_at == 5
    assert not conn.tasks and asgi == []


def test_an_upgrade_pipelined_behind_a_direct_request_does_not_end_it_twice(offered):
    conn, direct, asgi, _ = offered
    conn.data_received(b"GET /take HTTP/1.1\r\nhost: x\r\n\r\n"
                       b"GET /take/ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\n"
                       b"upgrade: websocket\r\nsec-websocket-version: 13\r\n"
                       b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert direct.offered == [b"/take"]
    assert direct.taken is not None and direct.taken.completions == 1


def test_a_body_past_max_buffered_body_bytes_is_a_503_and_a_close() -> None:
    # counted as it arrives (not reserved at the head): here the proxy already holds
    # 90 of its 100 bytes when this body's second part comes
    from fleet._proxy.http import HTTPProxy
    from fleet._proxy.http import _Direct as Direct

    logged: list[int] = []
    proxy = SimpleNamespace(buffered=90, max_buffered=100,
                            _log=lambda _v, _p, status, *_a: logged.append(status))
    proxy.no_room_answer = lambda rid: HTTPProxy.no_room_answer(proxy, rid)  # type: ignore[arg-type]
    transport = _Transport()
    conn = SimpleNamespace(transport=transport)
    d = Direct(proxy, conn, None, b"rid-1", 0.0, "POST", "/p", "/p", "app", "Ingress", "/",  # type: ignore[arg-type]
               "__call__", {}, {}, True)
    d.more_body = True
    d.body_part(b"12345")
    assert proxy.buffered == 95 and not transport.closed
    d.body_part(b"123456")
    assert transport.out.startswith(b"HTTP/1.1 503 ") and transport.closed
    assert b"max_buffered_body_bytes=100" in transport.out
    assert b"x-request-id: rid-1\r\n" in transport.out and b"connection: close" in transport.out
    assert proxy.buffered == 90 and logged == [503] and not d.reading
    d.lost()                            # the close that follows changes nothing
    assert proxy.buffered == 90 and logged == [503]


@pytest.mark.parametrize("header", [b"x-forwarded-for: 10.0.0.1", b"expect: 100-continue",
                                    b"connection: upgrade\r\nupgrade: websocket"])
def test_requests_that_need_the_asgi_way_are_not_offered(offered, header):
    conn, direct, asgi, _ = offered
    conn.data_received(b"GET /take HTTP/1.1\r\nhost: x\r\n" + header + b"\r\n\r\n")
    _settle(conn)
    assert direct.offered == []


def test_a_request_pipelined_behind_a_direct_one_waits_for_it(offered):
    conn, direct, asgi, transport = offered
    conn.data_received(b"GET /take HTTP/1.1\r\nhost: x\r\n\r\n"
                       b"GET /second HTTP/1.1\r\nhost: x\r\n\r\n")
    _settle(conn)
    # not offered while the first is in flight, and not started before it is answered
    assert direct.offered == [b"/take"] and asgi == [] and transport.out == b""
    direct.finish(conn)
    _settle(conn)
    assert asgi == ["/second"] and transport.out.endswith(b"ok")


# -- requests on the direct path through a real proxy ---------------------------------


@fleet.deployment
class Shapes:
    """Answers of each shape, chosen by path."""

    async def __call__(self, request: Request) -> Any:
        path = request.url.path
        if path.endswith("/empty"):
            return Response(status_code=204)
        if path.endswith("/stream"):
            async def parts() -> Any:
                yield b"one,"
                yield b"two"
            return StreamingResponse(parts())
        if path.endswith("/fail"):
            raise ValueError("no such shape")
        if path.endswith("/slow_stream"):
            marker = Path(request.query_params["marker"])

            async def slow() -> Any:
                try:
                    yield b"first"
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    marker.write_text("CancelledError")
                    raise
            return StreamingResponse(slow())
        if path.endswith("/bad_header"):
            response = Response(b"ok")
            response.raw_headers.append((b"x-n", 5))     # type: ignore[arg-type]
            return response
        if path.endswith("/close"):
            return Response(b"bye", headers={"connection": "close"})
        if path.endswith("/sleep"):
            await asyncio.sleep(0.5)
            return "slept"
        if path.endswith("/hang"):
            marker = Path(request.query_params["marker"])
            marker.with_suffix(".started").write_text("")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                marker.write_text("CancelledError")
                raise
        body = await request.body()
        return f"{request.method} {path} {request.url.query} {body.decode()}"


# the module's proxy has this request_timeout_s: long enough for every other request on
# a loaded machine, short enough to wait for twice
TIMEOUT_S = 2.0
# and this max_buffered_body_bytes
MAX_BUFFERED = 100_000


@pytest.fixture(scope="module")
def instance(tmp_path_factory) -> Iterator[tuple[int, Path]]:
    """The module's instance: its HTTP port, and the file its processes log to."""
    log = tmp_path_factory.mktemp("direct") / "stderr.log"
    fleet.shutdown()
    with stderr_into(log):
        fleet.start(http_options={"host": "127.0.0.1", "port": 0,
                                  "request_timeout_s": TIMEOUT_S,
                                  "max_buffered_body_bytes": MAX_BUFFERED})
    try:
        fleet.run(Shapes.bind(), name="shapes", route_prefix="/shapes")
        yield fleet.status()["proxies"]["http"]["port"], log
    finally:
        fleet.shutdown()


@pytest.fixture(scope="module")
def port(instance) -> int:
    return int(instance[0])


@pytest.fixture
def client(port) -> Iterator[RawClient]:
    c = RawClient(port)
    yield c
    c.close()


def test_pipelined_direct_and_asgi_requests_answer_in_order(client):
    client.sock.sendall(
        b"GET /shapes/a?x=1 HTTP/1.1\r\nhost: x\r\n\r\n"
        b"POST /shapes/b HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nbody"
        # a body over the direct path's bound goes the ASGI way
        b"POST /shapes/c HTTP/1.1\r\nhost: x\r\ncontent-length: 70000\r\n\r\n"
        + b"c" * 70000 +
        b"GET /shapes/d HTTP/1.1\r\nhost: x\r\nx-request-id: mine-1\r\n\r\n"
        b"GET /shapes/e HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 10.1.2.3\r\n\r\n"
        b"GET /shapes/f HTTP/1.1\r\nhost: x\r\n\r\n")
    got = [client.response() for _ in range(6)]
    assert [b for _, _, b in got] == [b"GET /shapes/a x=1 ", b"POST /shapes/b  body",
                                     b"POST /shapes/c  " + b"c" * 70000, b"GET /shapes/d  ",
                                     b"GET /shapes/e  ", b"GET /shapes/f  "]
    assert all(s == 200 for s, _, _ in got)
    assert got[3][1]["x-request-id"] == "mine-1"
    assert len({h["x-request-id"] for _, h, _ in got}) == 6


def test_answers_that_are_not_plain_keep_the_connection_usable(client):
    for path, status, body in [("/shapes/empty", 204, b""), ("/shapes/stream", 200,
                                                              b"one,two"),
                               ("/shapes/fail", 500, None), ("/shapes/plain", 200,
                                                             b"GET /shapes/plain  ")]:
        client.sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        got_status, headers, got = client.response()
        assert got_status == status, (path, got)
        if body is not None:
            assert got == body
        else:
            assert b"request_id" in got and headers["content-type"] == "application/json"
        assert headers.get("connection") != "close"
        assert client.head.lower().count(b"\r\nx-request-id: ") == 1, client.head


def test_an_answer_the_proxy_cannot_write_is_a_500_and_spares_the_replica_connection(port):
    # a header value that is not bytes: the ASGI way's 500, and the other request in
    # flight on the same replica connection is answered
    other, bad = RawClient(port), RawClient(port)
    try:
        _warm(other)
        other.sock.sendall(b"GET /shapes/sleep HTTP/1.1\r\nhost: x\r\n\r\n")
        bad.sock.sendall(b"GET /shapes/bad_header HTTP/1.1\r\nhost: x\r\n\r\n")
        assert bad.response()[0] == 500
        assert other.response()[:3:2] == (200, b"slept")
    finally:
        other.close()
        bad.close()


def test_closing_after_direct_answers_logs_no_error(instance):
    port, log = instance
    for request in (b"GET /shapes/one HTTP/1.0\r\n\r\n",
                    b"GET /shapes/close HTTP/1.1\r\nhost: x\r\n\r\n",
                    b"GET /shapes/kept HTTP/1.1\r\nhost: x\r\n\r\n"):
        c = RawClient(port)
        c.sock.sendall(request)
        assert c.response()[0] == 200
        c.close()                       # by the server first, or by the client
    c = RawClient(port)
    try:
        for i in range(3):              # later requests' lines: the closes were handled
            c.sock.sendall(f"GET /shapes/marker{i} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            assert c.response()[0] == 200
    finally:
        c.close()
    wait_for(lambda: "/shapes/marker2 200" in log.read_text(), what="the access-log line")
    text = log.read_text()     # (the replica's own tracebacks of the other tests' errors)
    assert "Exception in callback" not in text and "AttributeError" not in text, text[-3000:]


def test_http_1_0_gets_its_answer_and_a_close(client):
    client.sock.sendall(b"GET /shapes/old HTTP/1.0\r\n\r\n")
    status, headers, body = client.response()
    assert (status, body) == (200, b"GET /shapes/old  ")
    assert headers["connection"] == "close"
    assert client.closed_by_peer()


def test_a_client_that_leaves_cancels_its_direct_call(port, tmp_path):
    marker = tmp_path / "hang"
    leaving = RawClient(port)
    try:
        _warm(leaving)
        leaving.sock.sendall(f"GET /shapes/hang?marker={marker} HTTP/1.1\r\nhost: x\r\n"
                             "\r\n".encode())
        wait_for(marker.with_suffix(".started").exists, what="the replica to start the call")
    finally:
        leaving.close()
    wait_for(lambda: marker.exists() and marker.read_text() == "CancelledError",
             what="CancelledError in the replica")
    # and the proxy still serves
    c = RawClient(port)
    try:
        c.sock.sendall(b"GET /shapes/after HTTP/1.1\r\nhost: x\r\n\r\n")
        assert c.response()[2] == b"GET /shapes/after  "
    finally:
        c.close()


def _warm(client: RawClient) -> None:
    # a first answer: the proxy's connection to the replica is open, so the next request
    # can take the direct path (its first one waits for the connection the ASGI way)
    client.sock.sendall(b"GET /shapes/warm HTTP/1.1\r\nhost: x\r\n\r\n")
    assert client.response()[0] == 200


def test_request_timeout_is_504_and_cancels_the_call(client, tmp_path):
    marker = tmp_path / "late"
    _warm(client)
    started = time.monotonic()
    client.sock.sendall(f"GET /shapes/hang?marker={marker} HTTP/1.1\r\nhost: x\r\n\r\n"
                        .encode())
    status, headers, body = client.response()
    assert status == 504 and b"request_timeout_s=2.0" in body
    assert json.loads(body)["request_id"] == headers["x-request-id"]
    # it waited for request_timeout_s, and then no longer than the machine's slowness
    assert 0.9 * TIMEOUT_S < time.monotonic() - started < TIMEOUT_S + 30
    wait_for(lambda: marker.exists() and marker.read_text() == "CancelledError",
             what="CancelledError in the replica")
    client.sock.sendall(b"GET /shapes/next HTTP/1.1\r\nhost: x\r\n\r\n")
    assert client.response()[2] == b"GET /shapes/next  "     # the connection goes on


def test_request_timeout_cuts_a_started_stream(client, tmp_path):
    marker = tmp_path / "stream"
    _warm(client)
    client.sock.sendall(f"GET /shapes/slow_stream?marker={marker} HTTP/1.1\r\nhost: x"
                        "\r\n\r\n".encode())
    got = b""
    while data := client.sock.recv(65536):      # until the proxy cuts the connection
        got += data
    # the head and the first chunk went out, then a cut: no last chunk
    assert got.startswith(b"HTTP/1.1 200") and b"first" in got
    assert not got.endswith(b"0\r\n\r\n")
    wait_for(lambda: marker.exists() and marker.read_text() == "CancelledError",
             what="CancelledError in the replica's generator")


def test_a_head_that_declares_a_body_holds_no_room_before_the_body_comes(port):
    # the room a body takes is counted as its bytes arrive: heads that declare bodies
    # and send nothing do not refuse other clients' bodies
    idle = RawClient(port)
    try:
        idle.sock.sendall(b"POST /shapes/idle HTTP/1.1\r\nhost: x\r\n"
                          b"content-length: 60000\r\n\r\n")
        c = RawClient(port)
        try:
            _warm(c)                    # (the idle head was read before this, most likely)
            c.sock.sendall(b"POST /shapes/b HTTP/1.1\r\nhost: x\r\ncontent-length: "
                           b"50000\r\n\r\n" + b"b" * 50000)
            status, _, body = c.response()
            assert status == 200 and body == b"POST /shapes/b  " + b"b" * 50000
        finally:
            c.close()
        idle.sock.sendall(b"i" * 60000)
        assert idle.response()[:3:2] == (200, b"POST /shapes/idle  " + b"i" * 60000)
    finally:
        idle.close()
