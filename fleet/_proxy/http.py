"""The HTTP proxy: a raw ASGI app on uvicorn that forwards requests to ingress replicas.

The request path holds no lock and never touches the controller: match the route,
read the body, pick a replica through the Router, send one frame, write the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import uvicorn

from fleet._config import HTTPOptions
from fleet._proxy import traffic
from fleet._proxy.routes import RouteTable
from fleet._runtime import Runtime
from fleet._types import Tables
from fleet._wire import frames
from fleet.exceptions import (
    BackPressureError,
    DeploymentFailedError,
    FleetError,
    ReplicaDiedError,
)

log = logging.getLogger("fleet.proxy")
access_log = logging.getLogger("fleet.access")

_METHOD_HEADER = b"x-serve-call-method"
_HTTP_META = {"http": 1}
_SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string",
               "headers", "client", "server")
_JSON = [(b"content-type", b"application/json")]


class _Timeout(Exception):
    pass


def _json(status: int, payload: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
          ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(payload).encode()
    return status, _JSON + (extra or []), body


class HTTPProxy:
    """The proxy's ASGI app (before user middlewares wrap it)."""

    def __init__(self, runtime: Runtime, options: HTTPOptions) -> None:
        self.runtime = runtime
        self.options = options
        self.routes = RouteTable()
        self.timeout = options.request_timeout_s
        self.max_body = options.max_body_bytes
        self.root_path = options.root_path.rstrip("/")
        self.access = options.access_log
        runtime.table_listeners.append(self._on_tables)
        if runtime.tables is not None:
            self._on_tables(runtime.tables)

    def _on_tables(self, tables: Tables) -> None:
        self.routes.update({p: r for p, r in tables["routes"].items()
                            if r.get("protocol", "http") == "http"})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "websocket":
            from fleet._proxy.websocket import proxy_websocket  # type: ignore[import-not-found]
            await proxy_websocket(self, scope, receive, send)
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _respond(self, send: Any, status: int, headers: list[tuple[bytes, bytes]],
                       body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = time.perf_counter()
        path: str = scope["path"]
        if self.root_path and path.startswith(self.root_path):
            path = path[len(self.root_path):] or "/"
        if path.startswith("/-/"):
            await self._builtin(path, send)
            return
        hit = self.routes.match(path)
        if hit is None:
            await self._respond(send, *_json(404, {"error": f"no application serves path "
                                                            f"{path!r}", "routes":
                                                   sorted(self.routes.routes)}))
            return
        prefix, info = hit
        body = b""
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            if chunk:
                body = body + chunk if body else chunk
                if len(body) > self.max_body:
                    await self._respond(send, *_json(413, {
                        "error": f"request body exceeds max_body_bytes={self.max_body}"}))
                    return
            more = msg.get("more_body", False)
        method = "__call__"
        for name, value in scope["headers"]:
            if name == _METHOD_HEADER:
                method = value.decode("latin-1")
                break
        sub = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
        root = scope.get("root_path", "") or self.root_path
        if prefix != "/":
            root = root + prefix
        sub["root_path"] = root
        if root and not path.startswith(root):
            sub["path"] = root + path
        app, ingress = info["app"], info["ingress"]
        app, ingress = traffic.route_http(self.runtime, prefix, app, ingress, method, sub, body)
        status, replica = await self._forward(app, ingress, method, sub, body, receive, send)
        if self.access and access_log.isEnabledFor(logging.INFO):
            access_log.info('%s %s %d %.2fms app=%s replica=%s', scope["method"], path, status,
                            (time.perf_counter() - started) * 1000, app, replica)

    async def _forward(self, app: str, ingress: str, method: str, sub: dict[str, Any],
                       body: bytes, receive: Any, send: Any) -> tuple[int, str]:
        runtime = self.runtime
        router = runtime.router(app, ingress)
        try:
            slot, pending = await runtime.start_call(router, method, ((sub, body),), {},
                                                     _HTTP_META, True)
        except BackPressureError as exc:
            await self._respond(send, *_json(503, {"error": str(exc)}, [(b"retry-after", b"1")]))
            return 503, "-"
        except (DeploymentFailedError, FleetError, ReplicaDiedError) as exc:
            await self._respond(send, *_json(503, {"error": str(exc)}, [(b"retry-after", b"1")]))
            return 503, "-"
        loop = runtime.loop
        disc: asyncio.Task[Any] | None = None
        timer: asyncio.TimerHandle | None = None
        deadline = time.monotonic() + self.timeout if self.timeout else None
        status = 500
        try:
            chunks = pending.chunks
            assert chunks is not None
            while True:
                if not chunks:
                    waiter = loop.create_future()
                    pending.waiter = waiter
                    if disc is None:
                        disc = loop.create_task(receive())
                    disc.add_done_callback(lambda _t, w=waiter: w.done() or w.set_result(None))
                    if deadline is not None:
                        timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()),
                                             lambda w=waiter: w.done() or
                                             w.set_exception(_Timeout()))
                    try:
                        await waiter
                    finally:
                        pending.waiter = None
                        if timer is not None:
                            timer.cancel()
                    if not chunks:
                        pending.cancel()        # the client went away
                        return 499, slot.replica_id
                kind, value = chunks.popleft()
                if kind == frames.OK:
                    if status == 500:           # a whole response in one frame
                        status, headers, data = value
                        await self._respond(send, status, headers, data)
                    else:                       # the end of a streamed one
                        await send({"type": "http.response.body", "body": value})
                    return status, slot.replica_id
                if kind == frames.CHUNK:
                    if status == 500:
                        status, headers, data = value
                        await send({"type": "http.response.start", "status": status,
                                    "headers": headers})
                        await send({"type": "http.response.body", "body": data,
                                    "more_body": True})
                    else:
                        await send({"type": "http.response.body", "body": value,
                                    "more_body": True})
                    continue
                # an error from the replica
                if status == 500 and runtime.retry_elsewhere(router, slot, value):
                    return await self._forward(app, ingress, method, sub, body, receive, send)
                if status != 500:
                    raise value            # mid-stream: nothing sane to send; drop the connection
                return await self._error(value, app, ingress, slot.replica_id, send)
        except _Timeout:
            pending.cancel()
            await self._respond(send, *_json(504, {
                "error": f"the request took longer than request_timeout_s={self.timeout} and "
                         "was cancelled", "app": app, "deployment": ingress}))
            return 504, slot.replica_id
        finally:
            router.release(slot)

    async def _error(self, exc: BaseException, app: str, ingress: str, replica: str,
                     send: Any) -> tuple[int, str]:
        if isinstance(exc, ReplicaDiedError):
            await self._respond(send, *_json(503, {"error": str(exc), "app": app,
                                                   "deployment": ingress},
                                             [(b"retry-after", b"1")]))
            return 503, replica
        error_id = uuid.uuid4().hex[:12]
        tb = getattr(exc, "remote_traceback", "")
        log.error("error %s in app %s, deployment %s, replica %s: %s: %s\n%s", error_id, app,
                  ingress, replica, type(exc).__name__, exc, tb)
        etype = getattr(exc, "error_type", "") or type(exc).__name__
        await self._respond(send, *_json(500, {
            "error": "the deployment raised an exception", "error_id": error_id,
            "type": etype, "message": str(exc), "app": app, "deployment": ingress,
            "replica": replica}))
        return 500, replica

    async def _builtin(self, path: str, send: Any) -> None:
        if path == "/-/healthz":
            await self._respond(send, 200, [(b"content-type", b"text/plain")], b"success")
        elif path == "/-/routes":
            await self._respond(send, *_json(200, {p: r["app"]
                                                   for p, r in self.routes.routes.items()}))
        else:
            await self._respond(send, *_json(404, {"error": f"unknown fleet endpoint {path!r}"}))


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the proxy process owns signals."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    def capture_signals(self) -> Any:  # uvicorn >= 0.29
        import contextlib
        return contextlib.nullcontext()


def build_app(runtime: Runtime, options: HTTPOptions) -> Any:
    app: Any = HTTPProxy(runtime, options)
    for middleware in reversed(options.middlewares):
        cls, args, kwargs = middleware
        app = cls(app, *args, **kwargs)
    return app


async def serve_http(runtime: Runtime, options: HTTPOptions, stop: asyncio.Event) -> int:
    from fleet._proxy.process import bind_socket
    try:
        sock = bind_socket(options.host, options.port)
    except OSError as exc:
        await runtime.call_controller("proxy_ready", "http", {
            "error": f"the HTTP proxy cannot listen on {options.host}:{options.port}: {exc}"})
        return 1
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(runtime, options), loop="none", http="httptools",
                            ws="websockets-sansio", lifespan="off", access_log=False,
                            log_level="warning", timeout_keep_alive=30, server_header=False,
                            date_header=False)
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            return 1
        await asyncio.sleep(0.005)
    await runtime.call_controller("proxy_ready", "http", {"host": options.host, "port": port,
                                                          "pid": __import__("os").getpid()})
    await stop.wait()
    server.should_exit = True
    try:
        await asyncio.wait_for(task, 10)
    except asyncio.TimeoutError:
        task.cancel()
    return 0
