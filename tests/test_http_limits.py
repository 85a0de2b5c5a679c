"""The HTTP proxy's limits against slow, greedy and malicious clients, over raw sockets:
request heads (431, 414), slow heads (408), idle connections, the connection cap
(503), early 413s and the cap on request bodies held at once, each closing the
connection where the issue says so."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_for
from starlette.requests import Request

import fleet
from fleet._proxy.http import LOG_PATH_CHARS, _log_path

# header_timeout_s is seconds: the max_connections test holds 20 idle connections open
# while it makes one more, which a loaded machine may take a while to do
LIMITS = {"max_header_bytes": 4096, "max_headers": 20, "max_request_line_bytes": 1024,
          "header_timeout_s": 3.0, "keep_alive_timeout_s": 0.5, "max_connections": 20,
          "max_body_bytes": 800 * 1024, "max_buffered_body_bytes": 1024 * 1024}


@fleet.deployment
class Echo:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = 0

    async def __call__(self, request: Request) -> Any:
        body = await request.body()
        if request.query_params.get("hold"):
            self.waiting += 1
            await self.gate.wait()
        return {"bytes": len(body)}

    async def holding(self) -> int:
        return self.waiting

    async def release(self) -> None:
        self.gate.set()


@pytest.fixture(scope="module")
def setup() -> Iterator[dict[str, Any]]:
    fleet.shutdown()
    fleet.start(http_options={"port": 0, **LIMITS})
    try:
        handle = fleet.run(Echo.bind(), name="echo", route_prefix="/")
        yield {"port": fleet.status()["proxies"]["http"]["port"], "handle": handle}
    finally:
        fleet.shutdown()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a timeout fails the test)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _refused(sock: socket.socket, status: bytes) -> bytes:
    reply = _read_all(sock)     # ends: the server closed the connection
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:200]
    return reply


def _read_response(sock: socket.socket) -> bytes:
    """One response (with a content-length, or chunked), read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n")
               if line.lower().startswith(b"content-length:")]
    if not lengths:                     # chunked: up to the last, empty chunk
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection in a chunked body"
            body += chunk
        return head + b"\r\n\r\n" + body
    length = int(lengths[0])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection in a response's body"
        body += chunk
    assert len(body) == length, "more bytes than one response"
    return head + b"\r\n\r\n" + body


def test_the_rest_of_a_body_answered_early_is_not_the_next_head(setup):
    # the proxy answers /-/ paths itself without reading the body: what of the body
    # arrives afterwards is skipped, not counted as the next request's head (64 KiB is
    # far over max_header_bytes), and the connection serves the next request
    body = b"x" * (64 * 1024)
    with _connect(setup["port"]) as sock:
        sock.sendall(b"POST /-/nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % len(body))
        first = _read_response(sock)
        sock.sendall(body)
        sock.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        second = _read_response(sock)
    assert first.startswith(b"HTTP/1.1 404"), first[:200]
    assert second.startswith(b"HTTP/1.1 200") and b"\r\nsuccess\r\n" in second, second[:300]
    assert b"431" not in first + second


def test_a_body_answered_early_that_stops_arriving_is_closed_quietly(setup):
    with _connect(setup["port"]) as sock:
        sock.sendall(b"POST /-/nope HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        first = _read_response(sock)
        sock.sendall(b"x" * 10)         # then nothing: closed at header_timeout_s
        rest = _read_all(sock)
    assert first.startswith(b"HTTP/1.1 404")
    assert rest == b""                  # the answer went out already: no second one


def test_a_normal_request_with_a_large_body_in_one_write_passes(setup):
    body = b"b" * (600 * 1024)      # head and body arrive together, over max_header_bytes
    with _connect(setup["port"]) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % len(body) + body)
        reply = _read_all(sock)     # head and body may come in two reads
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"bytes":614400}')


def test_oversized_header_value_is_431_and_closed_before_it_ends(setup):
    with _connect(setup["port"]) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 * 1024))
        assert b"max_header_bytes=4096" in _refused(sock, b"431")


def test_many_small_headers_are_431(setup):
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(21))
    with _connect(setup["port"]) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        assert b"max_headers=20" in _refused(sock, b"431")


def test_long_request_line_is_414(setup):
    with _connect(setup["port"]) as sock:
        sock.sendall(b"GET /" + b"p" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"max_request_line_bytes=1024" in _refused(sock, b"414")
    with _connect(setup["port"]) as sock:       # one that never ends
        sock.sendall(b"GET /" + b"p" * (64 * 1024))
        _refused(sock, b"414")


def test_head_trickled_byte_by_byte_gets_408_at_the_header_timeout(setup):
    with _connect(setup["port"]) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.1)
        reply = b""
        deadline = time.monotonic() + 30
        while not reply:
            assert time.monotonic() < deadline, "the slow head was never cut off"
            try:
                reply = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")   # every byte would reset a keep-alive timer
                except OSError:
                    break
        sock.settimeout(10)
        try:
            reply += _read_all(sock)
        except ConnectionResetError:
            # the server closed with header bytes of ours unread, so the kernel reset
            # the connection: after its reply, which is already read
            pass
    assert reply.startswith(b"HTTP/1.1 408")


def test_body_that_stops_arriving_gets_408_and_is_closed(setup):
    with _connect(setup["port"]) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort")
        assert b"body stopped arriving" in _refused(sock, b"408")


def test_connection_that_sends_nothing_gets_408_and_is_closed(setup):
    with _connect(setup["port"]) as sock:
        _refused(sock, b"408")


def test_idle_keep_alive_connection_is_closed(setup):
    with _connect(setup["port"]) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _read_all(sock)     # the response, then the close at keep_alive_timeout_s
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"bytes":0}')


def test_declared_body_over_max_body_bytes_is_413_and_closed_unread(setup):
    with _connect(setup["port"]) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n")
        assert b"max_body_bytes" in _refused(sock, b"413")


def test_streamed_body_over_max_body_bytes_is_413_and_closed(setup):
    with _connect(setup["port"]) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"c" * (64 * 1024))
        try:
            for _ in range(20):     # 1.25 MiB, over 800 KiB
                sock.sendall(chunk)
            reply = _read_all(sock)
        except (ConnectionResetError, BrokenPipeError):
            # closed with the rest of the body unread: the kernel resets the connection
            # (or our next write finds it closed), and the 413 before it may be lost;
            # closed either way
            return
        assert reply.startswith(b"HTTP/1.1 413")


def test_bodies_over_max_buffered_body_bytes_get_503(setup):
    port, handle = setup["port"], setup["handle"]
    first = _connect(port)
    body = b"f" * (700 * 1024)
    first.sendall(b"POST /?hold=1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % len(body) + body)
    wait_for(lambda: handle.holding.remote().result() == 1)   # its 700 KiB are held
    body = b"s" * (500 * 1024)
    with _connect(port) as second:
        # the declared length does not fit: refused before a byte of the body is read
        second.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                       % len(body))
        assert b"max_buffered_body_bytes" in _refused(second, b"503")
    with _connect(port) as chunked:
        # a streamed body is counted as it arrives
        chunked.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            chunked.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            assert b"max_buffered_body_bytes" in _refused(chunked, b"503")
        except (ConnectionResetError, BrokenPipeError):
            pass                    # closed with the body unread (see above)
    handle.release.remote().result()
    assert first.recv(65536).startswith(b"HTTP/1.1 200")
    first.close()
    # the held bytes were given back: the same body passes now
    with _connect(port) as third:
        third.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                      % len(body) + body)
        assert third.recv(65536).startswith(b"HTTP/1.1 200")


def test_connections_over_max_connections_get_503_and_are_closed(setup):
    port = setup["port"]
    idle = [_connect(port) for _ in range(LIMITS["max_connections"])]
    try:
        with _connect(port) as extra:
            extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            _refused(extra, b"503")
    finally:
        for sock in idle:
            sock.close()

    def served() -> bool:
        with _connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return _read_all(sock).startswith(b"HTTP/1.1 200")
    wait_for(served)


def test_slow_heads_do_not_slow_other_clients(setup):
    port = setup["port"]
    slow = [_connect(port) for _ in range(5)]
    stop = threading.Event()
    try:
        for sock in slow:
            sock.sendall(b"GET / HTTP/1.1\r\n")
        with _connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _read_all(sock).startswith(b"HTTP/1.1 200")
    finally:
        stop.set()
        for sock in slow:
            sock.close()


def test_access_log_path_is_escaped_and_cut():
    assert _log_path("/a\nb\x1b[31m") == "/a\\nb\\x1b[31m"
    long = "/" + "x" * 5000
    cut = _log_path(long)
    assert cut.startswith("/xxx") and len(cut) == LOG_PATH_CHARS + 3 and cut.endswith("...")


def test_readme_lists_every_limit_with_its_default():
    import os
    import re

    from fleet._config import HTTPOptions
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        text = f.read()
    section = text[text.index("\n## Reliability\n"):]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", section, re.M))
    defaults = HTTPOptions()
    for option in ("max_header_bytes", "max_headers", "max_request_line_bytes",
                   "header_timeout_s", "keep_alive_timeout_s", "max_connections",
                   "max_body_bytes", "max_buffered_body_bytes"):
        assert option in rows, f"the README's limits table has no row for {option}"
        assert float(rows[option]) == getattr(defaults, option), option


def test_granian_server_bounds_heads_too():
    pytest.importorskip("granian")
    fleet.shutdown()
    fleet.start(http_options={"port": 0, "server": "granian", "max_header_bytes": 8192,
                              "header_timeout_s": 1.0, "access_log": False})
    try:
        fleet.run(Echo.bind(), name="echo", route_prefix="/")
        port = fleet.status()["proxies"]["http"]["port"]
        with _connect(port) as sock:
            try:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20))
                reply = _read_all(sock)
            except (ConnectionResetError, BrokenPipeError):
                reply = b""
        # Granian answers 431 or just closes; either way the head is not buffered
        assert reply == b"" or reply.startswith(b"HTTP/1.1 431")
        with _connect(port) as sock:        # half a head is cut off at the head timeout
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            reply = _read_all(sock)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408")
    finally:
        fleet.shutdown()
