"""uvicorn's httptools protocol with coalesced writes and limits on request heads.

uvicorn writes a response's head and its body with one ``transport.write`` each; for
the small responses a proxy mostly carries, those syscalls are a large share of the
proxy's CPU (see bench/README.md). Here every write of one event-loop iteration goes
out in a single ``write``: head and body together, and pipelined responses too.

The limits of ``http_options`` on request heads are enforced here, where the bytes
arrive, at a cost of a few attribute operations per request: bytes are counted per
``data_received`` call (not per header) while a head is incomplete, the exact head
size is computed only when that count passed the limit, and one timer per server
(:class:`HeadLimits`) closes connections whose head did not arrive in time.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

if TYPE_CHECKING:
    from fleet._config import HTTPOptions



class _CoalescingTransport:
    """Wraps a transport; writes made in one loop iteration leave as one write."""

    __slots__ = ("_transport", "_buffer", "_scheduled", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._buffer: list[bytes] = []
        self._scheduled = False
        self._loop = loop

    def write(self, data: bytes) -> None:
        self._buffer.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def write_now(self, data: bytes) -> None:
        """Write at once when nothing is waiting to be joined (a response answered
        outside the loop iteration that read its request is alone in its write)."""
        if self._buffer:
            self.write(data)
        elif not self._transport.is_closing():
            self._transport.write(data)

    def _flush(self) -> None:
        self._scheduled = False
        buffer = self._buffer
        if not buffer:
            return
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a coalescing transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


_HEADER_NAME = re.compile(rb'[\x00-\x1f\x7f()<>@,;:\[\]={} \t\\"]')
_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# response headers whose meaning the cycle's own send() handles (framing, closing)
_SPECIAL = frozenset((b"connection", b"transfer-encoding"))


def whole_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                   default_headers: list[tuple[bytes, bytes]], keep_alive: bool
                   ) -> bytes | None:
    """The bytes of one whole response, head and body, as uvicorn's ``send`` would write
    them for its two ASGI messages; None unless it is the plain case (a content-length
    that matches the body, a status that has a body, no header that changes framing or
    closing, names and values uvicorn would accept): then the caller goes the ASGI way."""
    if status < 200 or status in (204, 304) or status not in STATUS_LINE:
        return None
    content = [STATUS_LINE[status]]
    length = None
    for name, value in (*default_headers, *headers):
        name = name.lower()
        if name == b"content-length":
            length = value
        elif name in _SPECIAL:
            return None
        content += (name, b": ", value, b"\r\n")
    if length is None or not length.isdigit() or int(length) != len(body) \
            or _HEADER_NAME.search(b"".join([n for n, _ in headers])) \
            or _HEADER_VALUE.search(b"".join([v for _, v in headers])):
        return None
    if not keep_alive:
        content.append(b"connection: close\r\n")
    content += (b"\r\n", body)
    return b"".join(content)


def write_whole(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes
                ) -> bool:
    """Answer a request with one whole response: head and body in one write, as the two
    ASGI messages through uvicorn's ``send`` would be, without building them. Only for
    the plain case (send is uvicorn's own, the response not started, no method HEAD,
    and :func:`whole_response`'s); False otherwise, and the caller sends the messages
    instead."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle or cycle.response_started \
            or cycle.disconnected or cycle.flow.write_paused or cycle.access_log \
            or cycle.scope["method"] == "HEAD":
        return False
    data = whole_response(status, headers, body, cycle.default_headers, cycle.keep_alive)
    if data is None:
        return False
    cycle.response_started = cycle.response_complete = True
    cycle.waiting_for_100_continue = False
    cycle.transport.write(data)
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request over a limit."""


class HeadLimits:
    """The head limits of one HTTP server, and the sweep that times out slow heads and
    closes idle keep-alive connections.

    Why one sweep, not a timer per connection: a timer armed and cancelled for every
    request (uvicorn's keep-alive timer is one) is a measurable share of a no-op
    request; a sweep costs nothing per request and acts within a tick (a quarter of
    the shorter timeout, at most a second) of a deadline."""

    def __init__(self, options: HTTPOptions, loop: asyncio.AbstractEventLoop,
                 report: Callable[[int, str, str], bytes] | None = None) -> None:
        # report(status, method, target) logs a refusal and returns its request id
        self.report = report
        self.max_head = options.max_header_bytes
        self.max_headers = options.max_headers
        self.max_line = options.max_request_line_bytes
        self.timeout = options.header_timeout_s
        self.keep_alive = options.keep_alive_timeout_s
        self.loop = loop
        self.now = loop.time()      # refreshed every tick; what heads are timed from
        self.tick = min(1.0, self.timeout / 4, self.keep_alive / 4)
        self.connections: set[Any] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, connections: set[Any]) -> None:
        """Sweep uvicorn's set of open connections until stop()."""
        self.connections = connections
        self._timer = self.loop.call_later(self.tick, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        now = self.now = self.loop.time()
        timeout = self.timeout
        for conn in list(self.connections):
            if not isinstance(conn, LimitedHttpToolsProtocol):
                continue
            if conn.draining_body:
                if now - conn.last_data > timeout:
                    # the rest of a body answered early stopped arriving: the answer
                    # went out already, so the connection just closes
                    conn.draining_body = False
                    conn.transport.close()
                continue
            since = conn.head_since
            if since is not None:
                if conn.kept_alive and not conn.head_bytes:
                    if now - since > self.keep_alive:
                        # no byte of a next request within keep_alive_timeout_s
                        conn.head_since = None
                        conn.transport.close()
                elif now - since > timeout:
                    conn.refuse(408, "the request head did not arrive within "
                                     f"header_timeout_s={timeout}")
                continue
            cycle = conn.cycle
            if cycle is not None and cycle.more_body and not cycle.response_complete \
                    and not conn.flow.read_paused and now - conn.last_data > timeout:
                # a body that stopped arriving (and not because we stopped reading)
                conn.refuse(408, f"the request body stopped arriving for header_timeout_s="
                                 f"{timeout}")
        self._timer = self.loop.call_later(self.tick, self._sweep)


class LimitedHttpToolsProtocol(CoalescingHttpToolsProtocol):
    """Coalesced writes, plus ``http_options``' limits on request heads: 431 for a
    head over ``max_header_bytes`` or with over ``max_headers`` headers, 414 for a
    request line over ``max_request_line_bytes``, 408 for a head not complete within
    ``header_timeout_s`` of the connection's opening or its previous response; each
    closes the connection."""

    def __init__(self, *args: Any, limits: HeadLimits, direct: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        # the proxy's direct path (HTTPProxy.start_direct), or None: requests it takes
        # get no ASGI scope, cycle or task (see docs/architecture.md)
        self.direct = direct
        self.direct_req: Any = None     # the direct request in flight, if any
        # uvicorn's X-Forwarded-* handling for requests that carry such headers only:
        # for the others it is a layer of work per request that changes nothing
        self.forwarding_app = self.direct_app = self.app
        if isinstance(self.app, ProxyHeadersMiddleware):
            self.direct_app = self.app.app
        self.in_head = True             # reading a request head
        self.head_bytes = 0             # bytes received while reading it
        self.head_since: float | None = limits.now
        self.kept_alive = False         # idle after a response, not before a first request
        # answered before its body was all read (a 404, a 503): the rest of the body is
        # still arriving and is not the next request's head
        self.draining_body = False
        self.last_data = limits.now
        self._refusal: tuple[int, str] | None = None

    def data_received(self, data: bytes) -> None:
        self.last_data = self.limits.now
        if self.in_head:
            self.head_bytes += len(data)
        super().data_received(data)
        if self.in_head and self.head_bytes > self.limits.max_head and \
                not self.transport.is_closing():
            # still no whole head, and already more bytes than one may have
            url = getattr(self, "url", b"")
            if not self.headers and len(url) > self.limits.max_line:
                self.refuse(414, f"the request line exceeds max_request_line_bytes="
                                 f"{self.limits.max_line}")
            else:
                self.refuse(431, f"the request head exceeds max_header_bytes="
                                 f"{self.limits.max_head}")

    def on_message_begin(self) -> None:
        # uvicorn's, less the scope: built in on_headers_complete for requests that go
        # the ASGI way
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = None  # type: ignore[assignment]

    def asgi_scope(self) -> dict[str, Any]:
        """The start of the request's ASGI scope, as uvicorn's on_message_begin makes it
        (on_headers_complete adds the method, path and query)."""
        return {"type": "http", "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
                "http_version": "1.1", "server": self.server, "client": self.client,
                "scheme": self.scheme, "root_path": self.root_path, "headers": self.headers,
                "state": self.app_state.copy()}

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_since = None
        limits = self.limits
        self.app = self.direct_app
        for name, _ in self.headers:
            if name.startswith(b"x-forwarded-"):
                self.app = self.forwarding_app
                break
        if len(self.url) > limits.max_line:
            self._refuse_in_parser(414, "the request line exceeds max_request_line_bytes="
                                        f"{limits.max_line}")
        if len(self.headers) > limits.max_headers:
            self._refuse_in_parser(431, f"the request has more than max_headers="
                                        f"{limits.max_headers} headers")
        if self.head_bytes > limits.max_head:
            # the count included body bytes read with the head: measure the head itself
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > limits.max_head:
                self._refuse_in_parser(431, "the request head exceeds max_header_bytes="
                                            f"{limits.max_head}")
        if self.direct is not None and self.app is self.direct_app \
                and self.direct_req is None and not self.pipeline \
                and (self.cycle is None or self.cycle.response_complete) \
                and not self.expect_100_continue and not self.parser.should_upgrade() \
                and self.direct.start_direct(self):
            return
        self.scope = self.asgi_scope()  # type: ignore[assignment]
        super().on_headers_complete()

    def _unset_keepalive_if_required(self) -> None:
        pass                            # no keep-alive timer: HeadLimits' sweep closes

    def on_response_complete(self) -> None:
        # uvicorn's, but for its keep-alive timer per response
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:               # a next request was read already: start it
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        if self.cycle is not None and self.cycle.more_body:
            # answered early: the next head starts once this request's body has passed
            self.draining_body = True
            self.in_head = False
            self.head_since = None
            return
        self._next_head()

    def on_body(self, body: bytes) -> None:
        d: Any = self.direct_req
        if d is not None and d is self.cycle:
            if cast(Any, d).reading:    # (else refused: the rest is dropped)
                cast(Any, d).body_part(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        d: Any = self.direct_req
        if d is not None and d is self.cycle:
            # the direct request's end; or one that did not replace it as the cycle (a
            # websocket upgrade pipelined behind it, which uvicorn hands over as it is)
            if cast(Any, d).reading:
                cast(Any, d).complete()
        else:
            super().on_message_complete()
        if self.draining_body:          # the body answered early has all passed
            self.draining_body = False
            self._next_head()

    def connection_lost(self, exc: Exception | None) -> None:
        d: Any = self.direct_req
        if d is not None:
            self.direct_req = None
            if self.cycle is d:
                self.cycle = None  # type: ignore[assignment]
            d.lost()
        super().connection_lost(exc)

    def _next_head(self) -> None:
        self.in_head = True             # the next head starts now (none is parsed yet)
        self.kept_alive = True
        self.head_bytes = 0
        self.head_since = self.limits.now

    def _refuse_in_parser(self, status: int, message: str) -> None:
        # uvicorn answers a parser error with send_400_response: say which status
        self._refusal = (status, message)
        raise _Refused(message)

    def send_400_response(self, msg: str) -> None:
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            self.refuse(400, msg)       # a malformed request: answered, logged, closed
        else:
            self.refuse(*refusal)

    def refuse(self, status: int, message: str) -> None:
        """Answer status with message and close the connection."""
        self.head_since = None
        self.in_head = False
        if self.transport.is_closing():
            return
        body = message.encode("latin-1", "replace")
        rid = b""
        if self.limits.report is not None:
            url = getattr(self, "url", b"") or b""
            method = ""
            try:
                method = self.parser.get_method().decode("latin-1")
            except Exception:           # the parser never got as far as the method
                pass
            rid = self.limits.report(status, method, url[:2000].decode("latin-1"))
        self.transport.write(b"".join([
            STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
            b"x-request-id: " + rid + b"\r\n" if rid else b"",
            b"content-length: ", str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n",
            body]))
        self.transport.close()
