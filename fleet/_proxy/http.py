"""The HTTP proxy: a raw ASGI app on uvicorn that forwards requests to ingress replicas.

The request path holds no lock, builds no per-request framework objects and never
touches the controller: match the route, read the body, pick a replica through the
Router, send one frame, write the answer. Work a feature needs (timeouts, websockets,
disconnect watching) happens only on the requests that need it.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import itertools
import json
import logging
import os
import re
import socket
import sys
import time
import urllib.parse
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from fleet import _logs, _otel
from fleet._context import valid_traceparent
from fleet._logformat import stamp
from fleet._metrics import TIME_BUCKETS
from fleet._proxy import traffic
from fleet._proxy.errors import ErrorReports
from fleet._proxy.routes import RouteTable
from fleet._proxy.startup import bind_socket, cannot_listen, proxy_failed
from fleet._proxy.uvicorn_protocol import whole_response, write_whole
from fleet._router import Router, Slot
from fleet._runtime import Runtime
from fleet._types import ASGIApp, CallMeta, Tables
from fleet._wire import frames
from fleet._wire.channel import Pending
from fleet.exceptions import BackPressureError, FleetError, client_error

if TYPE_CHECKING:
    from fleet._config import HTTPOptions

log = logging.getLogger("fleet.proxy")

_METHOD_HEADER = b"x-serve-call-method"
_LENGTH_HEADER = b"content-length"
_CHUNKED_HEADER = b"transfer-encoding"
_HTTP_META: CallMeta = {"http": 1}
# A multiplexed model id (fleet.get_multiplexed_model_id): Ray Serve's header name,
# with underscores or dashes.
_MODEL_HEADERS = frozenset((b"serve_multiplexed_model_id", b"serve-multiplexed-model-id"))
_SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string",
               "headers", "client", "server")
_JSON = [(b"content-type", b"application/json")]
_ID_HEADER = b"x-request-id"
_TRACE_HEADER = b"traceparent"
# A client's own request id is kept when it is 1-128 of these characters.
_valid_id = re.compile(rb"[A-Za-z0-9._:-]{1,128}").fullmatch
# Where _RequestIdLayer (with user middlewares) leaves the id it chose for the proxy app.
_SCOPE_ID = "fleet.request_id"
_RETRY = [(b"retry-after", b"1")]
_CLOSE = [(b"connection", b"close")]
# Access-log lines show at most this much of a path.
LOG_PATH_CHARS = 1000
# The largest request body the direct path reads (uvicorn's own read buffer's high-water
# mark: a larger body goes the ASGI way, which pauses reading while it waits).
DIRECT_BODY_BYTES = 65536
# How long a request waits for its reply before the proxy starts watching for the
# client going away (a task per request otherwise: the price of cancel-on-disconnect).
DISCONNECT_WATCH_S = 0.05


# _forward's status when the replica refused the call unstarted (draining or full):
# the caller sends it again, in a loop rather than by recursion, as a full replica may
# refuse it many times.
_AGAIN = 0


class _Timeout(Exception):
    pass


class RequestIds:
    """New request ids: 32 hex digits, a random 64-bit per-process prefix and a counter.

    Unique within a proxy, and across proxies and restarts but for a 2**-64 chance per
    pair of processes: enough for what an id is for (finding a request in the logs),
    at a fraction of uuid4's cost on the request path."""

    __slots__ = ("prefix", "count")

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex().encode()
        self.count = itertools.count(1)

    def __call__(self) -> bytes:
        return b"%s%016x" % (self.prefix, next(self.count))


def _head_fields(headers: list[tuple[bytes, bytes]], method_header: bytes | None
                 ) -> tuple[str, bytes | None, bool, bytes | None, str | None, bytes | None]:
    """What the proxy reads from a request's headers, in one pass: the method to call
    (x-serve-call-method), the content-length value, whether the body is chunked, the
    client's own valid request id, the multiplexed model id and the traceparent."""
    method = "__call__"
    length = rid = trace = None
    chunked = False
    model = None
    for name, value in headers:
        if name == _LENGTH_HEADER:
            length = value
        elif name == method_header:
            method = value.decode("latin-1")
        elif name == _CHUNKED_HEADER:
            chunked = True
        elif name in _MODEL_HEADERS and value:
            model = value.decode("latin-1")
        elif name == _ID_HEADER and _valid_id(value):
            rid = value
        elif name == _TRACE_HEADER:
            trace = value
    return method, length, chunked, rid, model, trace


def _call_meta(rid: bytes, model: str | None, trace: bytes | None) -> CallMeta:
    """The call's metadata: the request id (the replica reads it as
    fleet.get_request_id(); handle calls carry it on), the model id, a valid
    traceparent (carried on through handle calls too)."""
    meta: CallMeta = {"http": 1, "rid": rid}
    if model is not None:
        meta["model"] = model
    if trace is not None:
        tp = trace.decode("latin-1").strip().lower()
        if valid_traceparent(tp):
            meta["tp"] = tp
    return meta


def _with_id(headers: Any, rid: bytes) -> list[tuple[bytes, bytes]]:
    if type(headers) is list:
        headers.append((_ID_HEADER, rid))
        return headers
    return [*headers, (_ID_HEADER, rid)]


def _json(status: int, payload: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
          ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(payload).encode()
    return status, _JSON + (extra or []), body    # a new list: _with_id may append


class AccessLog:
    """One line per request to stderr: method, path, status, latency, app, replica.

    Lines are joined and written once per loop iteration, like data-plane frames, so
    a busy proxy pays for a few string operations per request, not a write. With log
    files (fleet/_logs.py) each line also goes to the proxy's file as a JSON line built
    here from its fields (not parsed back from the text), kept in memory until the
    file's next flush."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: Any = None) -> None:
        self.loop = loop
        stream = stream or sys.stderr
        self.sink: Any = None
        if isinstance(stream, _logs.Tee):
            # the console gets the text, the file the JSON lines: no line is re-parsed
            self.sink, stream = stream.sink, stream.stream
        self.stream = stream
        self.lines: list[str] = []
        self.json: list[str] = []
        self.stamp = ""
        self.head = ""
        self.who: dict[tuple[str, str], str] = {}     # the JSON of (app, replica)

    def add(self, method: str, path: str, status: int, ms: float, app: str,
            replica: str, rid: bytes) -> None:
        if not self.lines:
            # one timestamp per loop iteration's lines: they were all answered within it
            self.loop.call_soon(self.flush)
            now = time.time()
            self.stamp = stamp(now)
            if self.sink is not None:
                self.head = _logs.json_head(now, "fleet.access")
        rid_text = rid.decode()
        message = (f"{method} {path} {status} {ms:.2f}ms app={app} replica={replica} "
                   f"id={rid_text}")
        self.lines.append(f"{self.stamp} INFO proxy fleet.access: {message}\n")
        if self.sink is not None:
            who = self.who.get((app, replica))
            if who is None:
                who = (f', "application": {_logs.encode(app)}, "deployment": "", '
                       f'"replica": {_logs.encode(replica)}, "request_id": "')
                if len(self.who) < 1024:    # applications x replicas: a few, bounded
                    self.who[(app, replica)] = who
            self.json.append(f'{self.head}{who}{rid_text}", "trace_id": "", '
                             f'"message": {_logs.encode(message)}}}\n')

    def flush(self) -> None:
        lines, self.lines = self.lines, []
        if self.json:
            self.sink.add("".join(self.json))
            self.json = []
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except (OSError, ValueError):
            pass


def _log_path(path: str) -> str:
    """A path safe for a log line: control and other unprintable characters escaped,
    at most LOG_PATH_CHARS characters."""
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                      for c in path[:LOG_PATH_CHARS])
    if len(escaped) > LOG_PATH_CHARS or len(path) > LOG_PATH_CHARS:
        escaped = escaped[:LOG_PATH_CHARS] + "..."
    return escaped


class HTTPProxy:
    """The proxy's ASGI app (before user middlewares wrap it)."""

    def __init__(self, runtime: Runtime, options: HTTPOptions) -> None:
        self.runtime = runtime
        self.options = options
        self.routes = RouteTable()
        self.timeout = options.request_timeout_s
        self.max_body = options.max_body_bytes
        # None switches the call-method header off: no header name equals it
        self.method_header = _METHOD_HEADER if options.call_method_header else None
        self.expose_errors = options.expose_errors
        self.new_id = RequestIds()
        self.errors = ErrorReports(runtime)
        self.max_buffered = options.max_buffered_body_bytes
        self.buffered = 0               # bytes of request bodies held right now
        self.root_path = options.root_path.rstrip("/")
        self.access = AccessLog(runtime.loop) if options.access_log else None
        self.oip = False            # any Open Inference Protocol model is deployed
        # request counts and latencies by (application, route, method, status), or None
        # when metrics are off (FLEET_METRICS=0)
        self.hist = None if runtime.metrics is None else runtime.metrics.histogram(
            "fleet_http_request_duration_seconds",
            ("application", "route", "method", "status_code"),
            count_name="fleet_http_requests_total")
        # OpenTelemetry (fleet/_otel.py): None unless spans were asked for
        self.tracer = _otel.tracer("proxy")
        runtime.table_listeners.append(self._on_tables)
        if runtime.tables is not None:
            self._on_tables(runtime.tables)

    def _on_tables(self, tables: Tables) -> None:
        self.routes.update({p: r for p, r in tables["routes"].items()
                            if r.get("protocol", "http") == "http"})
        # once a model was served, /v2 stays the protocol's (its repository can load)
        self.oip = self.oip or bool(tables.get("oip"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.tracer is not None:
                await self._traced(scope, receive, send)
                return
            await self.http(scope, receive, send)
        elif kind == "websocket":
            from fleet._proxy.websocket import proxy_websocket
            await proxy_websocket(self, scope, receive, send)
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _traced(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """One request in a ``fleet.http`` span: the client's traceparent is its parent,
        and the request goes on with the span's own traceparent."""
        from opentelemetry.trace import SpanKind, Status, StatusCode
        incoming = None
        headers = []
        for name, value in scope["headers"]:
            if name == _TRACE_HEADER:
                tp = value.decode("latin-1").strip().lower()
                incoming = tp if valid_traceparent(tp) else None
            else:
                headers.append((name, value))
        assert self.tracer is not None
        span = self.tracer.start_span("fleet.http", context=_otel.parent(incoming),
                                      kind=SpanKind.SERVER,
                                      attributes={"http.request.method": scope["method"],
                                                  "url.path": scope["path"][:256]})
        headers.append((_TRACE_HEADER, _otel.traceparent_of(span).encode()))
        status = [0]

        async def sent(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.http(dict(scope, headers=headers), receive, sent)
        finally:
            span.set_attribute("http.response.status_code", status[0])
            if status[0] >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()

    async def _respond(self, send: Any, status: int, headers: list[tuple[bytes, bytes]],
                       body: bytes, rid: bytes) -> None:
        headers = _with_id(headers, rid)
        if write_whole(send, status, headers, body):
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def local_path(self, scope: dict[str, Any]) -> str:
        """The request path below the proxy's root_path (a reverse proxy may keep it
        or strip it)."""
        path: str = scope["path"]
        root = self.root_path
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root):] or "/"
        return path

    def sub_scope(self, scope: dict[str, Any], path: str, prefix: str) -> dict[str, Any]:
        """The scope the replica sees: the route prefix mounted like an ASGI Mount, so
        ``root_path`` is where the app lives and ``path`` still the full path."""
        sub = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
        base = scope.get("root_path", "") or self.root_path
        if base:
            sub["path"] = base + path
        sub["root_path"] = base + prefix if prefix != "/" else base
        return sub

    async def http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """One HTTP request. Also the server's app itself when nothing wraps the proxy
        (a coroutine layer less per request): then it hands other scopes to __call__."""
        if scope["type"] != "http":
            await self(scope, receive, send)
            return
        started = time.perf_counter()
        method, length, chunked, rid, model, trace = _head_fields(scope["headers"],
                                                                  self.method_header)
        has_body = chunked or (length is not None and length != b"0")
        declared = int(length) if has_body and length is not None and length.isdigit() else 0
        too_large = declared > self.max_body
        if rid is None:
            rid = scope.get(_SCOPE_ID) or self.new_id()
        meta = _call_meta(rid, model, trace)
        path = self.local_path(scope)
        if path.startswith("/-/"):
            status = await self._builtin(path, send, rid)
            self._log(scope["method"], path, status, started, "-", "-", rid)
            return
        if too_large:
            # refused before reading a byte (no "100 Continue" is sent)
            await self._too_large(send, rid)
            self._log(scope["method"], path, 413, started, "-", "-", rid)
            return
        if self.oip and (path == "/v2" or path.startswith("/v2/")):
            # Open Inference Protocol models answer at the root, whatever the routes.
            from fleet._oip import rest
            status = await rest.handle(self, scope, receive, send, path, rid)
            self._log(scope["method"], path, status, started, "oip", "-", rid)
            return
        hit = self.routes.match(path)
        if hit is None:
            await self._respond(send, *_json(404, {
                "error": f"no application serves path {path!r}", "request_id": rid.decode(),
                "routes": sorted(self.routes.routes)}), rid)
            self._log(scope["method"], path, 404, started, "-", "-", rid)
            return
        prefix, info = hit
        body = b""
        sub = self.sub_scope(scope, path, prefix)
        app, ingress = info["app"], info["ingress"]
        if has_body:
            if self.buffered + declared > self.max_buffered:
                await self._no_room(send, rid)       # refused before reading a byte
                self._log(scope["method"], path, 503, started, app, "-", rid)
                return
            held = [0]                  # bytes of this body counted in self.buffered
            try:
                got = await self._read_body(receive, send, rid, held)
                if isinstance(got, int):    # refused (413, 503) or the client left (499)
                    self._log(scope["method"], path, got, started, app, "-", rid)
                    return
                body = got
                app, ingress = traffic.route_http(self.runtime, prefix, app, ingress, method,
                                                  sub, body)
                status, replica = await self._forward(app, ingress, method, sub, body,
                                                      receive, send, rid, meta)
                while status == _AGAIN:
                    status, replica = await self._forward(app, ingress, method, sub, body,
                                                          receive, send, rid, meta)
            finally:
                self.buffered -= held[0]
        else:
            app, ingress = traffic.route_http(self.runtime, prefix, app, ingress, method,
                                              sub, body)
            status, replica = await self._forward(app, ingress, method, sub, body, receive,
                                                  send, rid, meta)
            while status == _AGAIN:     # the replica refused it before starting: again
                status, replica = await self._forward(app, ingress, method, sub, body,
                                                      receive, send, rid, meta)
        self._log(scope["method"], path, status, started, app, replica, rid, prefix)

    def start_direct(self, conn: Any) -> bool:
        """Take the request whose head conn (the HTTP protocol) has just parsed onto the
        direct path, if it is the common case: no body or a content-length one of at
        most DIRECT_BODY_BYTES, no traffic policy, a route of a known deployment, not
        HEAD. Its body is collected and its call sent from the parser's callbacks, and
        its answer written from the replica connection's reading callback
        (:class:`_Direct`): no ASGI scope, cycle, task or coroutine per request. False
        (nothing done) otherwise: the request goes the ASGI way."""
        started = time.perf_counter()
        parser = conn.parser
        verb = parser.get_method()
        if verb == b"HEAD" or verb == b"CONNECT":
            return False
        headers = conn.headers
        method, length, chunked, rid, model, trace = _head_fields(headers, self.method_header)
        declared = 0
        if chunked:
            return False
        if length is not None and length != b"0":
            if not length.isdigit():
                return False
            declared = int(length)
        if declared and (declared > DIRECT_BODY_BYTES or declared > self.max_body
                         or self.buffered + declared > self.max_buffered):
            return False
        tables = self.runtime.tables
        if tables is None or tables["traffic"]:
            return False
        limit = conn.limit_concurrency
        if limit is not None and (len(conn.connections) >= limit or len(conn.tasks) >= limit):
            return False                # uvicorn's 503 for max_connections
        try:
            url = httptools.parse_url(conn.url)
            raw_path = url.path
            full = raw_path.decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            return False                # uvicorn's own handling says what is wrong
        if "%" in full:
            full = urllib.parse.unquote(full)
        path = full
        root = self.root_path
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root):] or "/"
        if path.startswith("/-/") or self.oip and (path == "/v2" or path.startswith("/v2/")):
            return False
        hit = self.routes.match(path)
        if hit is None:
            return False
        prefix, info = hit
        app, ingress = info["app"], info["ingress"]
        router = self.runtime.router(app, ingress)
        if not router.known:
            return False
        # from here on the request is the direct path's
        rid = rid or self.new_id()
        meta = _call_meta(rid, model, trace)
        version = parser.get_http_version()
        verb_text = verb.decode("ascii")
        sub = {"type": "http", "http_version": version, "method": verb_text,
               "scheme": conn.scheme, "path": (root + path) if root else full,
               "raw_path": raw_path, "query_string": url.query or b"", "headers": headers,
               "client": conn.client, "server": conn.server,
               "root_path": root + prefix if prefix != "/" else root}
        d = _Direct(self, conn, router, rid, started, verb_text, full, path, app, ingress,
                    prefix, method, sub, meta, version != "1.0" and parser.should_keep_alive())
        if declared:
            d.more_body = True          # (counted in buffered as it arrives)
        conn.direct_req = conn.cycle = d
        return True

    async def _resume(self, d: _Direct, receive: Any, send: Any,
                      first: tuple[int, Any] | None) -> None:
        """The rest of a direct request that needs the ASGI way: a call that could not
        start at once (first None), or an answer that is not a whole plain one (a
        stream, an error, a refusal to send again, a response with special headers)."""
        body = d.body
        app, ingress = d.app, d.ingress
        try:
            if first is None or d.pending is None or d.slot is None:
                app, ingress = traffic.route_http(self.runtime, d.prefix, app, ingress,
                                                  d.method, d.sub, body)
                status, replica = await self._forward(app, ingress, d.method, d.sub,
                                                      body, receive, send, d.rid, d.meta)
            else:
                status, replica = await self._relay(d.app, d.ingress, d.router, d.slot,
                                                    d.pending, receive, send, d.rid,
                                                    d.deadline, None, first)
            while status == _AGAIN:
                status, replica = await self._forward(app, ingress, d.method, d.sub,
                                                      body, receive, send, d.rid, d.meta)
        finally:
            d.unhold()
        self._log(d.verb, d.path, status, d.started, app, replica, d.rid, d.prefix)

    def _log(self, method: str, path: str, status: int, started: float, app: str,
             replica: str, rid: bytes, route: str = "") -> None:
        """The access log's line and the metrics of one response, whatever answered it."""
        hist = self.hist
        if hist is not None:
            elapsed = time.perf_counter() - started
            key = (app, route, method, status)
            cells = hist.series.get(key) or hist.cells(key)
            cells[bisect_left(TIME_BUCKETS, elapsed)] += 1
            cells[-1] += elapsed
        if self.access is not None:
            if len(path) > LOG_PATH_CHARS or not path.isprintable():
                path = _log_path(path)
            self.access.add(method, path, status,
                            (time.perf_counter() - started) * 1000, app, replica, rid)

    def log_refusal(self, status: int, method: str, target: str) -> bytes:
        """A response the HTTP protocol layer gave before any app saw the request (a
        head over its limits, a malformed request): its id and its access-log line."""
        rid = self.new_id()
        if self.access is not None:
            self.access.add(method or "-", _log_path(target or "-"), status, 0.0, "-", "-",
                            rid)
        return rid

    async def _read_body(self, receive: Any, send: Any, rid: bytes, held: list[int]
                         ) -> bytes | int:
        """The whole body, counted in self.buffered (and in held[0], which the caller
        gives back); else the status of what happened instead: 413 or 503 when it was
        refused (and answered), 499 when the client left."""
        parts: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return 499
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body:
                    await self._too_large(send, rid)
                    return 413
                if self.buffered + len(chunk) > self.max_buffered:
                    await self._no_room(send, rid)
                    return 503
                self.buffered += len(chunk)
                held[0] += len(chunk)
                parts.append(chunk)
            more = msg.get("more_body", False)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _too_large(self, send: Any, rid: bytes) -> None:
        # the rest of the body is not read: the connection cannot carry another request
        await self._respond(send, *_json(413, {
            "error": f"the request body exceeds max_body_bytes={self.max_body}",
            "request_id": rid.decode()}, _CLOSE), rid)

    async def _no_room(self, send: Any, rid: bytes) -> None:
        await self._respond(send, *self.no_room_answer(rid), rid)

    def no_room_answer(self, rid: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """503 when the proxy holds max_buffered_body_bytes of bodies already (and the
        connection closes: the rest of the body is not read)."""
        return _json(503, {
            "error": "the proxy holds max_buffered_body_bytes="
                     f"{self.max_buffered} of request bodies already; retry later",
            "request_id": rid.decode()}, _RETRY + _CLOSE)

    def timeout_answer(self, rid: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """504 when request_timeout_s passed (the call was cancelled)."""
        return _json(504, {
            "error": f"the request took longer than request_timeout_s={self.timeout} and "
                     "was cancelled", "request_id": rid.decode()})

    async def _forward(self, app: str, ingress: str, method: str, sub: dict[str, Any],
                       body: bytes, receive: Any, send: Any, rid: bytes,
                       meta: CallMeta = _HTTP_META) -> tuple[int, str]:
        runtime = self.runtime
        router = runtime.router(app, ingress)
        loop = runtime.loop
        deadline = loop.time() + self.timeout if self.timeout else None
        watch: _DisconnectWatch | None = None

        def queued(place: asyncio.Future[Any]) -> None:
            # No replica has room: a client that leaves while its call waits takes it
            # out of the queue, so it never runs.
            nonlocal watch
            watch = _DisconnectWatch(loop, receive)
            watch.drop_when_gone(place)

        try:
            start = runtime.start_call(router, method, ((sub, body),), {}, meta, True,
                                       queued)
            if deadline is None:
                slot, pending = await start
            else:
                slot, pending = await asyncio.wait_for(start, self.timeout)
        except asyncio.TimeoutError:
            return await self._timed_out(send, app, ingress, "-", rid)
        except asyncio.CancelledError:
            if watch is not None and watch.gone():
                return 499, "-"             # left while queued
            raise
        except FleetError as exc:
            return await self._error(exc, app, ingress, "-", send, rid)
        return await self._relay(app, ingress, router, slot, pending, receive, send, rid,
                                 deadline, watch)

    async def _relay(self, app: str, ingress: str, router: Router, slot: Slot,
                     pending: Pending, receive: Any, send: Any, rid: bytes,
                     deadline: float | None, watch: _DisconnectWatch | None,
                     first: tuple[int, Any] | None = None) -> tuple[int, str]:
        """Relay a started call's answer to the client (first: its first item, taken
        already); the status and the replica, or _AGAIN when it must be sent again."""
        loop = self.runtime.loop
        status = 500
        started = False                 # a streamed response's head went out
        try:
            chunks = pending.chunks
            assert chunks is not None
            while True:
                if first is not None:
                    kind, value = first
                    first = None
                elif not chunks:
                    waiter = pending.arm()
                    if watch is None:
                        watch = _DisconnectWatch(loop, receive)
                    watch.arm(waiter, deadline)
                    try:
                        await waiter
                    finally:
                        pending.disarm()
                        watch.disarm()
                    if not chunks:
                        pending.cancel()        # the client went away
                        return 499, slot.replica_id
                    kind, value = pending.pop()  # credits the replica's window
                else:
                    kind, value = pending.pop()
                if kind == frames.OK:
                    if not started:             # a whole response in one frame
                        status, headers, data = value
                        await self._respond(send, status, headers, data, rid)
                    else:                       # the end of a streamed one
                        await send({"type": "http.response.body", "body": value})
                    return status, slot.replica_id
                if kind == frames.CHUNK:
                    if not started:
                        started = True
                        # uvicorn drops writes to a gone client silently: watch for it
                        # from the start of a stream, or a fast producer would stream
                        # to no one for good
                        if watch is None:
                            watch = _DisconnectWatch(loop, receive)
                        watch.start_now()
                        status, headers, data = value
                        await send({"type": "http.response.start", "status": status,
                                    "headers": _with_id(headers, rid)})
                        await send({"type": "http.response.body", "body": data,
                                    "more_body": True})
                    else:
                        await send({"type": "http.response.body", "body": value,
                                    "more_body": True})
                    if watch is not None and watch.gone():
                        pending.cancel()
                        return 499, slot.replica_id
                    continue
                # an error from the replica
                if not started and self.runtime.retry_elsewhere(router, slot, value):
                    return _AGAIN, slot.replica_id
                if started:
                    raise value            # mid-stream: nothing sane to send; drop the connection
                return await self._error(value, app, ingress, slot.replica_id, send, rid)
        except _Timeout:
            pending.cancel()
            if started:
                raise                      # mid-stream: end the connection
            return await self._timed_out(send, app, ingress, slot.replica_id, rid)
        finally:
            if watch is not None:
                watch.close()
            router.release(slot)

    async def _timed_out(self, send: Any, app: str, ingress: str, replica: str, rid: bytes
                         ) -> tuple[int, str]:
        await self._respond(send, *self.timeout_answer(rid), rid)
        return 504, replica

    async def _error(self, exc: BaseException, app: str, ingress: str, replica: str,
                     send: Any, rid: bytes) -> tuple[int, str]:
        """Answer with exc's row of the error table; the exception goes to the log."""
        status, _code, message = client_error(exc)
        if not isinstance(exc, BackPressureError):    # an overload must not flood the log
            self.errors.failed("request", rid.decode(), app, ingress, replica, exc)
        payload = {"error": message, "request_id": rid.decode()}
        if self.expose_errors:
            payload["type"] = getattr(exc, "error_type", "") or type(exc).__name__
            payload["message"] = str(exc)
        await self._respond(send, *_json(status, payload, _RETRY if status == 503 else None),
                            rid)
        return status, replica

    async def _builtin(self, path: str, send: Any, rid: bytes) -> int:
        if path == "/-/healthz":
            await self._respond(send, 200, [(b"content-type", b"text/plain")], b"success", rid)
            return 200
        if path == "/-/livez":
            await self._respond(send, 200, [(b"content-type", b"text/plain")], b"alive", rid)
            return 200
        if path == "/-/readyz":
            waiting = self.not_ready()
            if waiting:
                await self._respond(send, *_json(503, {"ready": False, "waiting": waiting,
                                                       "request_id": rid.decode()}), rid)
                return 503
            await self._respond(send, *_json(200, {"ready": True}), rid)
            return 200
        if path == "/-/routes":
            await self._respond(send, *_json(200, {p: r["app"]
                                                   for p, r in self.routes.routes.items()}),
                                rid)
            return 200
        await self._respond(send, *_json(404, {"error": f"unknown fleet endpoint {path!r}",
                                               "request_id": rid.decode()}), rid)
        return 404


    def not_ready(self) -> dict[str, str]:
        """Applications that are not RUNNING (every deployment healthy), with why; an
        instance with no application at all is not ready either."""
        tables = self.runtime.tables
        if tables is None or not tables["deployments"]:
            return {"": "no application is deployed"}
        out: dict[str, str] = {}
        for key, table in tables["deployments"].items():
            if table["status"] != "HEALTHY":
                app, _, dep = key.partition("#")
                out.setdefault(app, f"deployment {dep!r} is {table['status']}"
                               + (f": {table['message']}" if table.get("message") else ""))
        return out


class _Direct:
    """A request on the proxy's direct path (:meth:`HTTPProxy.start_direct`), from its
    head to the response written. It stands in for uvicorn's request cycle on the
    connection (``conn.cycle``) while it is in flight, with the attributes uvicorn and
    the head limits read there. Its body (at most DIRECT_BODY_BYTES) arrives through
    :meth:`body_part`; at :meth:`complete` the call goes to a replica with room and an
    open connection, and :meth:`reply` runs in that connection's reading callback: a
    whole plain answer is written at once. Anything else (no replica free now, a stream,
    an error) turns the request into an ASGI cycle and task that goes on as the ASGI
    way would (:meth:`promote`)."""

    __slots__ = ("proxy", "conn", "router", "slot", "pending", "rid", "started", "verb",
                 "full_path", "path", "app", "ingress", "prefix", "method", "sub", "meta",
                 "keep_alive", "response_complete", "more_body", "disconnected", "cycle",
                 "parts", "held", "deadline", "timer", "reading")

    def __init__(self, proxy: HTTPProxy, conn: Any, router: Router, rid: bytes,
                 started: float, verb: str, full_path: str, path: str, app: str,
                 ingress: str, prefix: str, method: str, sub: dict[str, Any], meta: CallMeta,
                 keep_alive: bool) -> None:
        self.proxy = proxy
        self.conn = conn
        self.router = router
        self.slot: Slot | None = None
        self.pending: Pending | None = None
        self.rid = rid
        self.started = started
        self.verb = verb
        self.full_path = full_path
        self.path = path
        self.app = app
        self.ingress = ingress
        self.prefix = prefix
        self.method = method
        self.sub = sub
        self.meta = meta
        self.keep_alive = keep_alive    # uvicorn's shutdown() may turn it off
        self.response_complete = False
        self.more_body = False          # the body is still arriving (the head sweep reads it)
        self.disconnected = False
        self.cycle: RequestResponseCycle | None = None   # once promoted
        self.parts: list[bytes] = []
        self.held = 0                   # bytes counted in the proxy's buffered
        self.deadline: float | None = None      # request_timeout_s, from the call's start
        self.timer: asyncio.TimerHandle | None = None
        self.reading = True             # until the request's end was parsed

    @property
    def body(self) -> bytes:
        parts = self.parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def unhold(self) -> None:
        if self.held:
            self.proxy.buffered -= self.held
            self.held = 0

    def body_part(self, data: bytes) -> None:
        proxy = self.proxy
        size = len(data)
        if proxy.buffered + size > proxy.max_buffered:
            self._no_room()
            return
        proxy.buffered += size
        self.held += size
        self.parts.append(data)

    def _no_room(self) -> None:
        # the ASGI way's answer when the proxy holds max_buffered_body_bytes already: 503
        # and close (the rest of the body is not read); the connection keeps this request
        # as its cycle until it closes, so the rest of the body is dropped
        self.reading = self.more_body = False
        self.response_complete = True
        self.unhold()
        proxy = self.proxy
        status, headers, body = proxy.no_room_answer(self.rid)
        headers += [(_LENGTH_HEADER, b"%d" % len(body)), (_ID_HEADER, self.rid)]
        transport = self.conn.transport
        transport.write(b"".join([b"HTTP/1.1 503 Service Unavailable\r\n",
                                  *[n + b": " + v + b"\r\n" for n, v in headers],
                                  b"\r\n", body]))
        transport.close()
        proxy._log(self.verb, self.path, 503, self.started, self.app, "-", self.rid)

    def complete(self) -> None:
        """The whole request is in: send the call if a replica has room now."""
        if not self.reading:
            return
        self.reading = self.more_body = False
        tables = self.proxy.runtime.tables
        slot = None
        if tables is not None and not tables["traffic"]:
            slot = self.router.try_acquire(self.meta.get("model"))
        if slot is None:
            # wait for one (or be refused) the ASGI way; a traffic policy that came
            # while the body arrived applies there
            self.promote(None)
            return
        channel = slot.channel
        assert channel is not None
        try:
            pending = channel.call(self.method, ((self.sub, self.body),), {}, self.meta,
                                   True)
        except Exception:
            self.router.release(slot)
            self.promote(None)
            return
        self.slot = slot
        self.pending = pending
        pending.notify = self.reply
        timeout = self.proxy.timeout
        if timeout:
            loop = self.proxy.runtime.loop
            self.deadline = deadline = loop.time() + timeout
            self.timer = loop.call_at(deadline, self._expire)

    def reply(self) -> None:
        """The answer's first item arrived (in the replica connection's reading callback,
        which must not see an exception: it would take the connection down)."""
        pending = self.pending
        assert pending is not None
        pending.notify = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            kind, value = pending.pop()
        except Exception:               # (not expected: the item is there)
            log.exception("the proxy's direct path failed to read an answer")
            self._abort()
            return
        try:
            if kind == frames.OK and not self.conn.flow.write_paused:
                status, headers, body = value
                if self._answer(status, headers, body):
                    return
        except Exception:
            pass        # a malformed answer (a header that is not bytes): the ASGI way's 500
        try:
            self.promote((kind, value))
        except Exception:
            log.exception("the proxy's direct path failed to hand a request on")
            self._abort()

    def _abort(self) -> None:
        """End a request that cannot be answered: its connection closes (as uvicorn
        closes one whose app failed after starting its response)."""
        if self.response_complete:
            return
        self.response_complete = True
        self.unhold()
        if self.slot is not None:
            self.router.release(self.slot)
        conn = self.conn
        if conn.direct_req is self:
            conn.direct_req = None
        if conn.cycle is self:
            conn.cycle = None
        conn.transport.close()

    def _answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """Write a whole response if it is the plain case, and end the request."""
        conn = self.conn
        if conn.direct_req is not self:
            return False
        data = whole_response(status, [*headers, (_ID_HEADER, self.rid)], body,
                              conn.server_state.default_headers, self.keep_alive)
        if data is None:
            return False
        slot = self.slot
        assert slot is not None
        self.router.release(slot)
        self.unhold()
        self.response_complete = True
        conn.direct_req = None
        if conn.cycle is self:
            conn.cycle = None           # nothing of this request stays on the connection
        transport = conn.transport
        if self.keep_alive:
            transport.write_now(data)   # nothing of the connection's waits to go before it
        else:
            transport.write(data)
            transport.close()
        self.proxy._log(self.verb, self.path, status, self.started, self.app,
                        slot.replica_id, self.rid, self.prefix)
        conn.on_response_complete()
        return True

    def _expire(self) -> None:
        # request_timeout_s passed with no answer: cancel the call, answer 504
        self.timer = None
        pending = self.pending
        if self.response_complete or self.cycle is not None or pending is None:
            return
        pending.notify = None
        pending.cancel()
        status, headers, body = self.proxy.timeout_answer(self.rid)
        headers.append((_LENGTH_HEADER, b"%d" % len(body)))
        if not self._answer(status, headers, body):
            self.promote(None)          # (not reached: a 504 is always the plain case)

    def promote(self, first: tuple[int, Any] | None) -> None:
        """Go on as an ASGI request: a cycle of uvicorn's on the connection and a task
        running the rest of HTTPProxy's handling (first: the answer's first item, taken
        already; None when the call was not sent)."""
        conn = self.conn
        scope = conn.asgi_scope()
        sub = self.sub
        scope.update(method=self.verb, http_version=sub["http_version"], path=self.full_path,
                     raw_path=sub["raw_path"], query_string=sub["query_string"],
                     headers=sub["headers"])
        cycle = RequestResponseCycle(
            scope=scope, transport=conn.transport, flow=conn.flow, logger=conn.logger,
            access_logger=conn.access_logger, access_log=conn.access_log,
            default_headers=conn.server_state.default_headers,
            message_event=asyncio.Event(), expect_100_continue=False,
            keep_alive=self.keep_alive, on_response=self._finished)
        cycle.more_body = False
        self.cycle = cycle
        if conn.cycle is self:
            conn.cycle = cycle
        proxy = self.proxy

        def rest(_scope: Any, receive: Any, send: Any) -> Any:
            return proxy._resume(self, receive, send, first)

        task = proxy.runtime.loop.create_task(cycle.run_asgi(rest))
        task.add_done_callback(conn.tasks.discard)
        task.add_done_callback(self._unhold_after)   # (also if cancelled before it ran)
        conn.tasks.add(task)

    def _unhold_after(self, _task: asyncio.Task[Any]) -> None:
        self.unhold()

    def _finished(self) -> None:
        conn = self.conn
        if conn.direct_req is self:
            conn.direct_req = None
        conn.on_response_complete()

    def lost(self) -> None:
        """The client's connection closed."""
        cycle = self.cycle
        if cycle is not None:           # promoted: the ASGI way's disconnect handling
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.message_event.set()
            return
        if self.response_complete:
            return
        self.response_complete = True
        self.unhold()
        replica = "-"
        route = ""                      # left while its body arrived: no route, as the
        pending = self.pending          # ASGI way counts it
        if pending is not None and self.slot is not None:
            route = self.prefix
            pending.notify = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            pending.cancel()
            self.router.release(self.slot)
            replica = self.slot.replica_id
        self.proxy._log(self.verb, self.path, 499, self.started, self.app, replica,
                        self.rid, route)


class _DisconnectWatch:
    """Wakes a request's waiter when its client disconnects or its deadline passes.

    Most replies come back within microseconds, so the task that reads ``receive()``
    for a disconnect starts only once a request has waited DISCONNECT_WATCH_S."""

    __slots__ = ("loop", "receive", "task", "waiter", "timer", "deadline_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, receive: Any) -> None:
        self.loop = loop
        self.receive = receive
        self.task: asyncio.Task[Any] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline_timer: asyncio.TimerHandle | None = None

    def arm(self, waiter: asyncio.Future[None], deadline: float | None) -> None:
        self.waiter = waiter
        task = self.task
        if task is None:
            self.timer = self.loop.call_later(DISCONNECT_WATCH_S, self._start)
        elif task.done():
            waiter.set_result(None)
        if deadline is not None:
            self.deadline_timer = self.loop.call_at(deadline, self._expire)

    def disarm(self) -> None:
        self.waiter = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None

    def _start(self) -> None:
        self.timer = None
        self.task = self.loop.create_task(self._until_disconnect())
        self.task.add_done_callback(self._gone)

    def start_now(self) -> None:
        """Watch from now on (a streamed response)."""
        if self.task is None:
            if self.timer is not None:
                self.timer.cancel()
            self._start()

    def gone(self) -> bool:
        """Whether the client has disconnected."""
        return self.task is not None and self.task.done()

    def drop_when_gone(self, place: asyncio.Future[Any]) -> None:
        """Cancel a queued call's place in the Router's queue if the client leaves."""
        self.start_now()
        assert self.task is not None

        def drop(_task: asyncio.Task[Any]) -> None:
            if not place.done():
                place.cancel()
        self.task.add_done_callback(drop)

    async def _until_disconnect(self) -> None:
        # a request whose (empty) body was never read gets it here first
        while (await self.receive())["type"] != "http.disconnect":
            pass

    def _gone(self, _task: asyncio.Task[Any]) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _expire(self) -> None:
        self.deadline_timer = None
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(_Timeout())

    def close(self) -> None:
        self.disarm()
        # a pending receive() ends by itself when the response completes


class _WebSocketProtocol(asyncio.Protocol):
    """uvicorn's websocket protocol (the websockets library's sans-I/O one), imported at
    the first upgrade: a proxy that never sees a websocket does not load the library
    (about 1.8 MiB of its memory)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from uvicorn.protocols.websockets.websockets_sansio_impl import (
            WebSocketsSansIOProtocol,
        )
        return WebSocketsSansIOProtocol(*args, **kwargs)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the proxy process owns signals."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    def capture_signals(self) -> Any:  # uvicorn >= 0.29
        import contextlib
        return contextlib.nullcontext()


def _import(path: str) -> Any:
    module, _, name = path.replace(":", ".").rpartition(".")
    if not module:
        raise ValueError(f"middleware {path!r} is not an import path like "
                         "'starlette.middleware.cors.CORSMiddleware'")
    return getattr(importlib.import_module(module), name)


def middleware_spec(entry: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """(class, args, kwargs) of one ``http_options["middlewares"]`` entry.

    Python gives ``starlette.middleware.Middleware(cls, **options)`` (or a bare class);
    YAML gives ``{"cls": "starlette.middleware.cors.CORSMiddleware", **options}`` or an
    import path string."""
    if isinstance(entry, str):
        return _import(entry), (), {}
    if isinstance(entry, dict):
        options = dict(entry)
        cls = options.pop("cls", None)
        if cls is None:
            raise ValueError(f"middleware {entry!r} has no 'cls' (the middleware class or "
                             "its import path)")
        return (_import(cls) if isinstance(cls, str) else cls), (), options
    if isinstance(entry, type):
        return entry, (), {}
    cls, args, kwargs = entry
    return cls, tuple(args), dict(kwargs)


class _RequestIdLayer:
    """Outside the user's middlewares: answers they make themselves (a CORS preflight)
    carry the request's id too, the same id the proxy app uses and logs."""

    def __init__(self, app: Any, new_id: RequestIds) -> None:
        self.app = app
        self.new_id = new_id

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = next((v for n, v in scope["headers"] if n == _ID_HEADER and _valid_id(v)),
                   None) or self.new_id()
        scope[_SCOPE_ID] = rid

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(n.lower() == _ID_HEADER for n, _ in headers):
                    headers.append((_ID_HEADER, rid))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def build_app(runtime: Runtime, options: HTTPOptions) -> ASGIApp:
    """The proxy app wrapped in the configured middlewares (the first is outermost)."""
    return wrap(HTTPProxy(runtime, options), options)


def wrap(proxy: HTTPProxy, options: HTTPOptions) -> Any:
    """proxy wrapped in options' middlewares (the first is outermost)."""
    if not options.middlewares and proxy.tracer is None:
        return proxy.http
    app: Any = proxy
    for middleware in reversed(options.middlewares):
        cls, args, kwargs = middleware_spec(middleware)
        app = cls(app, *args, **kwargs)
    if options.middlewares:
        app = _RequestIdLayer(app, proxy.new_id)
    return app


async def serve_http(runtime: Runtime, options: HTTPOptions, stop: asyncio.Event,
                     shared: socket.socket | None = None, index: int = 0) -> int:
    """Serve until stop is set. shared: the listening socket this proxy shares with the
    instance's other HTTP proxies (num_proxies > 1), the index-th of them."""
    try:
        proxy = HTTPProxy(runtime, options)
        app = wrap(proxy, options)
    except Exception as exc:
        return await proxy_failed(runtime, "http",
                                  f"http_options middlewares: {type(exc).__name__}: {exc}",
                                  index)
    if options.server == "granian":
        from fleet._proxy.granian_server import serve_granian
        return await serve_granian(runtime, options, app, stop)
    if shared is not None:
        sock = shared
        sock.setblocking(False)
    else:
        try:
            sock = bind_socket(options.host, options.port)
        except OSError as exc:
            return await proxy_failed(runtime, "http", cannot_listen(
                "HTTP", options.host, options.port, exc))
    port = sock.getsockname()[1]
    from fleet._proxy.uvicorn_protocol import HeadLimits, LimitedHttpToolsProtocol
    loop = asyncio.get_running_loop()
    limits = HeadLimits(options, loop, report=proxy.log_refusal)
    # the direct path is the proxy's own request handling, so only when nothing wraps it
    direct = proxy if app == proxy.http else None
    # uvicorn's limit_concurrency counts the connection asking too: one more lets
    # max_connections connections in, and answers a request on the next with 503 and
    # closes it
    config = uvicorn.Config(app, loop="none", interface="asgi3",
                            http=functools.partial(  # type: ignore[arg-type]
                                LimitedHttpToolsProtocol, limits=limits, direct=direct),
                            ws=_WebSocketProtocol, lifespan="off", access_log=False,
                            log_level="warning",
                            timeout_keep_alive=options.keep_alive_timeout_s,  # type: ignore[arg-type]
                            limit_concurrency=options.max_connections + 1,
                            server_header=False, date_header=False,
                            ssl_keyfile=getattr(options, "ssl_keyfile", None),
                            ssl_certfile=getattr(options, "ssl_certfile", None))
    server = _Server(config)
    task = loop.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            return 1
        await asyncio.sleep(0.005)
    limits.start(server.server_state.connections)
    scheme = "https" if getattr(options, "ssl_certfile", None) else "http"
    await runtime.announce("proxy_ready", "http", {"host": options.host, "port": port,
                                                          "pid": os.getpid(), "index": index,
                                                          "scheme": scheme})
    await stop.wait()
    limits.stop()
    server.should_exit = True
    try:
        await asyncio.wait_for(task, 10)
    except asyncio.TimeoutError:
        task.cancel()
    return 0
