"""The gRPC proxy: grpc.aio with one generic handler that passes bytes to ingress replicas.

The proxy never parses a user's message: request bytes go to the replica as they came,
and the reply's bytes come back as they were sent (see ``fleet/_replica/grpc.py`` for
the replica's side). The application is chosen by the ``application`` metadata key.
An RPC whose kind the proxy knows (the built-in Predict, the ``grpc_servicer_functions``
and what ingress replicas describe) gets a handler of its kind; any other is served as a
stream both ways, which is the same on the wire for every kind.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from fleet import _otel
from fleet._context import current_traceparent, set_traceparent, valid_traceparent
from fleet._grpc_schema import CODES, GrpcStatus, load_servicer_function, servicer_handlers
from fleet._proxy import traffic
from fleet._proxy.errors import ErrorReports
from fleet._proxy.startup import proxy_failed
from fleet._router import Router
from fleet._runtime import Runtime
from fleet._types import CallMeta, GrpcReply, Tables
from fleet._wire import frames
from fleet._wire.channel import Pending
from fleet.exceptions import BackPressureError, FleetError, client_error

if TYPE_CHECKING:
    from fleet._config import GRPCOptions

log = logging.getLogger("fleet.proxy")

_BUILTIN_SERVICERS = (
    "fleet.generated.serve_pb2_grpc.add_PredictAPIsServiceServicer_to_server",
    "fleet.generated.ray_serve_pb2_grpc.add_PredictAPIsServiceServicer_to_server",
)
_OWN_SERVICES = (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
_UNKNOWN = grpc.StatusCode.UNKNOWN
_MAX_FALLBACKS = 1024


class _Kind:
    """One RPC the proxy knows: its name for the replica and its kind, and the port it
    is served on (None: the proxy's own port)."""

    __slots__ = ("full", "rpc", "fn", "stream_in", "stream_out", "port")

    def __init__(self, full: str, fn: str | None, stream_in: bool, stream_out: bool,
                 port: int | None = None) -> None:
        self.full = full
        self.rpc = full.rpartition("/")[2]
        self.fn = fn
        self.stream_in = stream_in
        self.stream_out = stream_out
        self.port = port

    def on_port(self, port: int) -> _Kind:
        return _Kind(self.full, self.fn, self.stream_in, self.stream_out, port)


class GRPCProxy(grpc.GenericRpcHandler):
    """Routes every RPC to an application's ingress replica."""

    def __init__(self, runtime: Runtime, options: GRPCOptions) -> None:
        self.runtime = runtime
        self.options = options
        self.timeout = options.request_timeout_s
        self.expose_errors = options.expose_errors
        self.errors = ErrorReports(runtime)
        self.tracer = _otel.tracer("proxy")        # None unless spans were asked for
        # calls and their latency by (route: the RPC's full name, status code)
        self.hist = None if runtime.metrics is None else runtime.metrics.histogram(
            "fleet_grpc_request_duration_seconds", ("route", "status_code"),
            count_name="fleet_grpc_requests_total")
        self.apps: dict[str, str] = {}            # app name -> ingress deployment
        self.grpc_apps: list[str] = []            # apps whose ingress is a gRPC driver
        self.port_apps: dict[int, list[str]] = {}  # port -> apps whose driver asked for it
        self.port = options.port                  # the port bound, once bound
        self.shared = False         # one of several gRPC proxies sharing its ports
        self.kinds: dict[str, _Kind] = {}
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        self.health: Any = None
        self._fallbacks: dict[str, grpc.RpcMethodHandler] = {}
        self.services: set[str] = set(_OWN_SERVICES)
        self._described: dict[str, tuple[str, ...]] = {}
        self.reflection: Any = None
        self.ports: _Ports | None = None
        for path in [*_BUILTIN_SERVICERS, *options.grpc_servicer_functions]:
            self._learn(servicer_handlers(load_servicer_function(path)), path)
        runtime.table_listeners.append(self._on_tables)
        if runtime.tables is not None:
            self._on_tables(runtime.tables)

    # -- what the proxy knows ----------------------------------------------------------
    def _learn(self, methods: dict[str, Any], fn: str | None) -> None:
        for full, h in methods.items():
            kind = _Kind(full, fn, bool(h.request_streaming), bool(h.response_streaming))
            self._add_kind(kind)

    def _add_kind(self, kind: _Kind) -> None:
        if kind.full in self.handlers:
            return
        service = kind.full[1:].rpartition("/")[0]
        self.services.add(service)
        if self.reflection is not None:
            # the reflection servicer keeps its names in a tuple; refresh it
            self.reflection._service_names = tuple(sorted(self.services))
        if self.health is not None:
            self.runtime.loop.create_task(
                self.health.set(service, health_pb2.HealthCheckResponse.SERVING))
        self.kinds[kind.full] = kind
        self.handlers[kind.full] = self.handler(kind)

    def handler(self, kind: _Kind, fallback: bool = False) -> grpc.RpcMethodHandler:
        """The grpc handler serving one RPC of kind (on kind's port)."""
        if fallback:
            async def any_kind(requests: Any, context: Any, k: _Kind = kind) -> None:
                await self._stream(k, None, requests, context, fallback=True)
            return grpc.stream_stream_rpc_method_handler(any_kind)
        if not kind.stream_in and not kind.stream_out:
            async def unary(request: bytes, context: Any, k: _Kind = kind) -> bytes:
                return await self._unary(k, request, context)
            handler = grpc.unary_unary_rpc_method_handler(unary)
        elif not kind.stream_in:
            async def unary_stream(request: bytes, context: Any, k: _Kind = kind) -> None:
                await self._stream(k, request, None, context)
            handler = grpc.unary_stream_rpc_method_handler(unary_stream)
        elif not kind.stream_out:
            async def stream_unary(requests: Any, context: Any, k: _Kind = kind) -> Any:
                return await self._stream(k, None, requests, context)
            handler = grpc.stream_unary_rpc_method_handler(stream_unary)
        else:
            async def stream_stream(requests: Any, context: Any, k: _Kind = kind) -> None:
                await self._stream(k, None, requests, context)
            handler = grpc.stream_stream_rpc_method_handler(stream_stream)
        return handler

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self.handlers.get(method)
        if handler is not None:
            return handler
        handler = self._fallbacks.get(method)
        if handler is None:
            # Unknown kind: a stream both ways carries any kind of RPC.
            handler = self.handler(_Kind(method, None, True, True), fallback=True)
            if len(self._fallbacks) < _MAX_FALLBACKS:
                self._fallbacks[method] = handler
        return handler

    def _on_tables(self, tables: Tables) -> None:
        apps: dict[str, str] = {}
        grpc_apps: list[str] = []
        port_apps: dict[int, list[str]] = {}
        for info in tables["routes"].values():
            apps[info["app"]] = info["ingress"]
            if info.get("protocol") == "grpc":
                grpc_apps.append(info["app"])
            port = info.get("grpc_port")
            if port is not None:
                port_apps.setdefault(port, []).append(info["app"])
        self.apps = apps
        self.grpc_apps = sorted(grpc_apps)
        self.port_apps = {p: sorted(a) for p, a in port_apps.items()}
        if self.ports is not None:
            self.ports.want(set(port_apps) - {self.port})
        for app in grpc_apps:
            key = _replica_ids(tables, app, apps[app])
            if key and self._described.get(app) != key:
                self._described[app] = key
                self.runtime.loop.create_task(self._describe(app, apps[app]))

    async def _describe(self, app: str, ingress: str) -> None:
        """Learn a gRPC driver's RPCs (kinds, and its schema for reflection)."""
        router = self.runtime.router(app, ingress)
        try:
            slot, pending = await self.runtime.start_call(
                router, "__grpc_describe__", (None,), {}, {"grpc": "", "describe": 1}, False)
            try:
                info = await asyncio.wait_for(pending.result(), 10)
            finally:
                router.release(slot)
            for module in info["modules"]:
                importlib.import_module(module)    # its descriptors, for reflection
            for full, (stream_in, stream_out) in info["methods"].items():
                self._add_kind(_Kind(full, None, stream_in, stream_out))
        except Exception as exc:   # the catch-all handler still serves its RPCs
            log.warning("could not learn the RPCs of application %r: %s", app, exc)

    def _route(self, context: Any, port: int | None
               ) -> tuple[str, str, tuple[tuple[str, Any], ...]]:
        md = context.invocation_metadata() or ()
        pairs = tuple((m[0], m[1]) for m in md)
        app = None
        for key, value in pairs:
            if key == "application":
                app = value
                break
        if app is None:
            asked = self.port_apps.get(self.port if port is None else port, ())
            if len(asked) == 1:             # the application whose driver asked for it
                app = asked[0]
            elif port is not None or len(asked) > 1:
                raise GrpcStatus(grpc.StatusCode.NOT_FOUND,
                              "set the 'application' metadata key to the application to "
                              f"call; on port {port or self.port}: {asked or 'none'}, "
                              f"running: {sorted(self.apps) or 'none'}")
            elif len(self.grpc_apps) == 1:
                app = self.grpc_apps[0]
            elif len(self.apps) == 1:
                app = next(iter(self.apps))
            else:
                raise GrpcStatus(grpc.StatusCode.NOT_FOUND,
                              "set the 'application' metadata key to the application to call; "
                              f"running: {sorted(self.apps) or 'none'}")
        ingress = self.apps.get(app)
        if ingress is None:
            raise GrpcStatus(grpc.StatusCode.NOT_FOUND,
                          f"no application named {app!r} is running; running: "
                          f"{sorted(self.apps) or 'none'}")
        return app, ingress, pairs

    # -- serving -----------------------------------------------------------------------
    def _meta(self, kind: _Kind, pairs: Any, context: Any, stream_in: bool,
              stream_out: bool) -> CallMeta:
        remaining = context.time_remaining()
        if self.timeout is not None and (remaining is None or remaining > self.timeout):
            remaining = self.timeout
        meta: CallMeta = {"grpc": kind.full, "md": pairs, "fn": kind.fn,
                "in": "data" if stream_in else "args", "out": stream_out,
                "timeout": remaining}
        for key, value in pairs:
            if key == "multiplexed_model_id" and value:     # fleet.get_multiplexed_model_id
                meta["model"] = value
            elif key == "x-request-id" and isinstance(value, str) and _valid_id(value):
                meta["rid"] = value                         # fleet.get_request_id
            elif key == "traceparent" and isinstance(value, str) \
                    and valid_traceparent(value.strip().lower()):
                meta["tp"] = value.strip().lower()          # W3C trace context
        if self.tracer is not None:
            tp = current_traceparent()                      # the call's fleet.grpc span
            if tp is not None:
                meta["tp"] = tp
        return meta

    async def _start(self, kind: _Kind, request: bytes | None, context: Any,
                     stream_in: bool, stream_out: bool) -> tuple[Router, Any, Pending]:
        try:
            app, ingress, pairs = self._route(context, kind.port)
            meta = self._meta(kind, pairs, context, stream_in, stream_out)
            app, ingress = traffic.route_grpc(self.runtime, app, ingress, kind.rpc, request,
                                              meta, stream_out)
            router = self.runtime.router(app, ingress)
            slot, pending = await self.runtime.start_call(router, kind.rpc, (request,), {},
                                                          meta, stream_out)
        except GrpcStatus as st:
            await context.abort(st.code, st.details, _id_metadata(context))
            raise AssertionError("unreachable") from None
        except FleetError as exc:
            await self._error(exc, context, "-", "-")
            raise AssertionError("unreachable") from None
        return router, slot, pending

    async def _bounded(self, call: Any, context: Any) -> Any:
        """Run one call's handler body under ``request_timeout_s`` (the client's own
        deadline needs nothing here: grpc cancels the handler when it passes). The
        bound covers the whole call, the wait for a free replica included."""
        timeout = self.timeout
        if timeout is None:
            return await call
        try:
            return await asyncio.wait_for(call, timeout)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the call took longer than request_timeout_s={timeout} "
                                "and was cancelled", _id_metadata(context))

    async def _unary(self, kind: _Kind, request: bytes, context: Any) -> bytes:
        if self.tracer is not None:
            return await self._traced(kind, self._unary_call(kind, request, context), context)
        if self.hist is None:
            return await self._bounded(self._unary_call(kind, request, context), context)
        return await self._measured(kind, self._unary_call(kind, request, context), context)

    async def _traced(self, kind: _Kind, call: Any, context: Any) -> Any:
        """A call in a ``fleet.grpc`` span (the client's traceparent metadata its parent),
        whose traceparent the call carries on."""
        from opentelemetry.trace import SpanKind
        incoming = None
        for key, value in context.invocation_metadata() or ():
            if key == "traceparent" and isinstance(value, str) \
                    and valid_traceparent(value.strip().lower()):
                incoming = value.strip().lower()
        span = self.tracer.start_span("fleet.grpc", context=_otel.parent(incoming),
                                      kind=SpanKind.SERVER,
                                      attributes={"rpc.method": kind.full})
        set_traceparent(_otel.traceparent_of(span))     # this task's context: _meta reads it
        try:
            if self.hist is None:
                return await self._bounded(call, context)
            return await self._measured(kind, call, context)
        finally:
            span.end()

    async def _measured(self, kind: _Kind, call: Any, context: Any) -> Any:
        """Run a call's body and count it (fleet_grpc_requests_total and its duration)
        under the status it ended with."""
        started = time.perf_counter()
        code = "OK"
        try:
            return await self._bounded(call, context)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code_of(context)
            raise
        finally:
            assert self.hist is not None
            self.hist.observe((kind.full, code), time.perf_counter() - started)

    async def _unary_call(self, kind: _Kind, request: bytes, context: Any) -> bytes:
        while True:
            router, slot, pending = await self._start(kind, request, context, False, False)
            try:
                value = await pending.result()
            except asyncio.CancelledError:
                pending.cancel()        # the client cancelled, or a deadline passed
                raise
            except BaseException as exc:
                if self.runtime.retry_elsewhere(router, slot, exc):
                    continue            # that replica was stopping and never started it
                await self._error(exc, context, router.app, router.deployment)
                raise AssertionError("unreachable") from None
            finally:
                router.release(slot)
            if type(value) is bytes:
                return value
            return await self._finish(value, context)

    async def _stream(self, kind: _Kind, request: bytes | None, requests: Any, context: Any,
                      fallback: bool = False) -> Any:
        call = self._stream_call(kind, request, requests, context, fallback)
        if self.tracer is not None:
            return await self._traced(kind, call, context)
        if self.hist is None:
            return await self._bounded(call, context)
        return await self._measured(kind, call, context)

    async def _stream_call(self, kind: _Kind, request: bytes | None, requests: Any,
                           context: Any, fallback: bool) -> Any:
        stream_out = kind.stream_out
        router, slot, pending = await self._start(kind, request, context,
                                                  requests is not None, stream_out)
        pump: asyncio.Task[None] | None = None
        if requests is not None:
            pump = asyncio.get_running_loop().create_task(_pump(requests, pending))
        try:
            if not stream_out:
                value = await pending.result()
                if type(value) is bytes:
                    return value
                return await self._finish(value, context)
            await self._relay(pending, context, fallback)
            return None
        except asyncio.CancelledError:
            pending.cancel()
            raise
        except grpc.aio.AbortError:
            raise
        except BaseException as exc:
            await self._error(exc, context, router.app, router.deployment)
        finally:
            if pump is not None:
                pump.cancel()
            # A client that cancels makes context.write raise (not CancelledError):
            # whatever ended the relay, the replica's call ends too.
            pending.cancel()
            router.release(slot)

    async def _relay(self, pending: Pending, context: Any, fallback: bool) -> None:
        while True:
            kind, value = await pending.next()
            if kind == frames.CHUNK:
                await context.write(value)
                continue
            if type(value) is bytes:
                await context.write(value)
                return
            reply: GrpcReply = value
            if reply.message is not None and fallback:
                if reply.initial:
                    await context.send_initial_metadata(reply.initial)
                await context.write(reply.message)
                reply = reply._replace(message=None, initial=())
            await self._finish(reply, context)
            return

    async def _finish(self, value: GrpcReply, context: Any) -> Any:
        message, code_value, details, trailing, initial = value
        if initial:
            await context.send_initial_metadata(initial)
        code = CODES.get(code_value, _UNKNOWN)
        if code == grpc.StatusCode.OK:
            if trailing:
                context.set_trailing_metadata(trailing)
            if details:
                context.set_details(details)
            return message
        # the user's code chose this status and details: they pass as they are
        await context.abort(code, details, (*trailing, *_id_metadata(context)))
        return None

    async def _error(self, exc: BaseException, context: Any, app: str, deployment: str
                     ) -> None:
        """End the call with exc's row of the error table; the exception goes to the log
        under the call's id, which the client gets as ``x-request-id``."""
        _status, code_name, message = client_error(exc)
        trailing = _id_metadata(context)
        if not isinstance(exc, BackPressureError):    # an overload must not flood the log
            self.errors.failed("call", trailing[0][1], app, deployment, "-", exc)
        if self.expose_errors:
            etype = getattr(exc, "error_type", "") or type(exc).__name__
            message = f"{message}: {etype}: {exc}"
        await context.abort(grpc.StatusCode[code_name], message, trailing)


def _id_metadata(context: Any) -> tuple[tuple[str, str], ...]:
    """The call's id as trailing metadata: the client's own ``x-request-id`` when it is
    a valid id, else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _valid_id(value):
            return (("x-request-id", value),)
    return (("x-request-id", _new_id()),)


_valid_id = re.compile(r"[A-Za-z0-9._:-]{1,128}").fullmatch


def _code_of(context: Any) -> str:
    """The status a call that raised ended with (an abort sets it), by name."""
    try:
        code = context.code()
    except Exception:       # noqa: BLE001 - older grpc: no code() on the context
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN"


def _new_id() -> str:
    return os.urandom(16).hex()


async def _pump(requests: AsyncIterator[bytes], pending: Pending) -> None:
    """Client messages into the replica's call, then the end-of-stream marker."""
    try:
        async for message in requests:
            if pending.done:
                return
            await pending.send(message)     # waits while the replica is a window behind
    except Exception:   # the client went away: the handler's cancellation ends the call
        return
    if not pending.done:
        pending.send_data(None)


class _PortHandler(grpc.GenericRpcHandler):
    """Serves the proxy's RPCs on a port a driver asked for (``DefaultgRPCDriver.bind(g,
    port=P)``): the same handlers, with that port's application as the default."""

    def __init__(self, proxy: GRPCProxy, port: int) -> None:
        self.proxy = proxy
        self.port = port
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self.handlers.get(method)
        if handler is None:
            kind = self.proxy.kinds.get(method)
            fallback = kind is None
            if kind is None:
                kind = _Kind(method, None, True, True)
            handler = self.proxy.handler(kind.on_port(self.port), fallback)
            if len(self.handlers) < _MAX_FALLBACKS + len(self.proxy.kinds):
                self.handlers[method] = handler
        return handler


class _Ports:
    """The extra ports: one grpc.aio server each (a started grpc server cannot add or
    drop ports), opened when a driver asks for a port and stopped when none does.
    Changes run one at a time; the controller hears the result (``ports``,
    ``port_errors``) so ``fleet.run`` can wait for the port or report why it failed."""

    def __init__(self, proxy: GRPCProxy, runtime: Runtime, options: GRPCOptions,
                 info: dict[str, Any]) -> None:
        self.proxy = proxy
        self.runtime = runtime
        self.options = options
        self.info = info
        self.servers: dict[int, grpc.aio.Server] = {}
        self.errors: dict[int, str] = {}
        self.wanted: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def want(self, ports: set[int]) -> None:
        self.wanted = ports
        if self._task is None or self._task.done():
            self._task = self.runtime.loop.create_task(self._apply())

    async def _apply(self) -> None:
        while True:
            wanted = set(self.wanted)
            have = set(self.servers) | set(self.errors)
            if wanted == have:
                return
            for port in sorted(have - wanted):
                self.errors.pop(port, None)
                server = self.servers.pop(port, None)
                if server is not None:
                    await server.stop(grace=2)
            for port in sorted(wanted - have):
                try:
                    self.servers[port] = await _open_server(self.proxy, self.options.host,
                                                            port, _PortHandler(self.proxy,
                                                                               port))
                except Exception as exc:
                    log.error("the gRPC proxy cannot listen on port %s: %s", port, exc)
                    self.errors[port] = (f"the gRPC proxy cannot listen on "
                                         f"{self.options.host}:{port}: {exc}")
            await self.report()

    async def report(self) -> None:
        info = dict(self.info, ports=sorted([self.info["port"], *self.servers]),
                    port_errors=dict(self.errors))
        try:
            await self.runtime.announce("proxy_ready", "grpc", info)
        except Exception as exc:   # the instance is stopping
            log.debug("could not report the gRPC ports: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for server in self.servers.values():
            await server.stop(grace=2)
        self.servers.clear()


async def _open_server(proxy: GRPCProxy, host: str, port: int,
                       handler: grpc.GenericRpcHandler) -> grpc.aio.Server:
    """A started grpc.aio server on host:port with health, reflection and handler."""
    # A port held by another process must fail loudly, not be shared (but by this
    # instance's own gRPC proxies, when there are several).
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(proxy.shared))])
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(proxy.reflection, server)
    server.add_generic_rpc_handlers((handler,))
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(str(exc)) from None
    if not bound:
        raise OSError("the port is taken")
    await server.start()
    for service in ["", *proxy.services]:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server


def _replica_ids(tables: Tables, app: str, ingress: str) -> tuple[str, ...]:
    dep = tables["deployments"].get(f"{app}#{ingress}")
    if dep is None:
        return ()
    return tuple(sorted(r["replica_id"] for r in dep["replicas"]))


def _add_oip(server: Any, runtime: Runtime, options: GRPCOptions, proxy: GRPCProxy) -> None:
    """The Open Inference Protocol's service, ahead of the catch-all handler (it needs
    NumPy; without it the service is absent)."""
    try:
        from fleet._oip.grpc import SERVICE, add_service
    except ImportError as exc:
        log.info("inference.GRPCInferenceService (the Open Inference Protocol) is not "
                 "served: %s; pip install 'fleet[examples]' to serve it", exc)
        return
    add_service(server, runtime, options.request_timeout_s)
    proxy.services.add(SERVICE)


async def serve_grpc(runtime: Runtime, options: GRPCOptions, stop: asyncio.Event,
                     shared: bool = False, index: int = 0) -> int:
    """Run the gRPC proxy until stop is set; reports its address to the controller.
    shared: one of several gRPC proxies on the port (num_proxies > 1), the index-th; the
    driver checked that no other process holds the port."""
    try:
        proxy = GRPCProxy(runtime, options)
    except Exception as exc:
        return await proxy_failed(runtime, "grpc",
                                  f"the gRPC proxy could not load grpc_servicer_functions: {exc}",
                                  index)
    proxy.shared = shared
    # A port held by another process must fail loudly, not be shared (but by this
    # instance's own gRPC proxies, when there are several).
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(shared))])
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    proxy.reflection = reflection.aio.ReflectionServicer(sorted(proxy.services))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(proxy.reflection, server)
    _add_oip(server, runtime, options, proxy)
    server.add_generic_rpc_handlers((proxy,))
    address = f"{options.host}:{options.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        port, error = 0, str(exc)
    else:
        error = "the port is taken"
    if not port:
        return await proxy_failed(runtime, "grpc",
                                  f"the gRPC proxy cannot listen on {address}: {error}", index)
    await server.start()
    for service in ["", *proxy.services]:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    proxy.health = health
    proxy.port = port
    info = {"host": options.host, "port": port, "pid": os.getpid(), "index": index,
            "ports": [port],
            "port_errors": {}}
    proxy.ports = _Ports(proxy, runtime, options, info)
    await runtime.announce("proxy_ready", "grpc", info)
    if runtime.tables is not None:
        proxy._on_tables(runtime.tables)    # ports asked for before this proxy started
    await stop.wait()
    await health.enter_graceful_shutdown()
    await proxy.ports.close()
    await server.stop(grace=2)
    return 0
