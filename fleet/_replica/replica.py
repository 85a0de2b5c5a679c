"""A replica: builds the user object, runs its methods and answers the controller."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import logging
import os
import secrets
import time
import types
import weakref
from bisect import bisect_left
from typing import Any

import cloudpickle

from fleet import _context, _multiplex, _otel
from fleet._batching import batch_stats, take_batch_metrics
from fleet._metrics import SIZE_BUCKETS, TIME_BUCKETS, Recorder
from fleet._runtime import Runtime, set_current
from fleet._types import CallMeta, ModelsMsg, ReplicaSpec, deployment_key
from fleet._wire.errors import error_info
from fleet._wire.listener import ServerConnection, bound_port, listen
from fleet.exceptions import MethodNotFoundError, ReplicaDrainingError, ReplicaFullError

log = logging.getLogger("fleet.replica")

ASYNC, SYNC, AGEN, GEN = "async", "sync", "agen", "gen"

# A call this long makes one more write per reply negligible (see Replica._serve).
SLOW_CALL_S = 0.001

# Methods fleet itself calls on the user's object: never reachable over HTTP.
LIFECYCLE_METHODS = frozenset({"reconfigure", "check_health"})


def _kind(fn: Any) -> str:
    target = getattr(fn, "__func__", fn)
    target = inspect.unwrap(target)
    if inspect.isasyncgenfunction(target):
        return AGEN
    if inspect.isgeneratorfunction(target):
        return GEN
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(fn):
        return ASYNC
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        call = type(target).__dict__.get("__call__")
        if call is not None and inspect.iscoroutinefunction(call):
            return ASYNC
    return SYNC


def _call_sync(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # asyncio cannot put a StopIteration into a future: the call would never answer.
    # Turn it into a RuntimeError, as Python does for coroutines and generators.
    try:
        return fn(*args, **kwargs)
    except StopIteration as exc:
        raise RuntimeError(f"{getattr(fn, '__qualname__', fn)} raised StopIteration") \
            from exc


def _defined_by_class(cls: type, name: str) -> bool:
    """Whether a class of cls's MRO (object aside) defines name as a method."""
    for klass in cls.__mro__[:-1]:
        value = vars(klass).get(name)
        if value is not None:
            return callable(value) or isinstance(value, staticmethod | classmethod)
    return False


class Replica:
    """The serving side of one replica process (a listener Handler)."""

    def __init__(self, spec: ReplicaSpec, loop: asyncio.AbstractEventLoop,
                 own_process: bool = True) -> None:
        self.spec = spec
        self.loop = loop
        # The driver checked the options (spec.config is DeploymentConfig's dump): read
        # them as they are, so a replica process needs no pydantic.
        self.config = types.SimpleNamespace(**spec.config)
        self.where = (f"deployment {spec.deployment_name!r} of application "
                      f"{spec.app_name!r}, replica {spec.replica_id}")
        self.runtime = Runtime(loop, spec.controller_address, spec.secret)
        # Its callers' connections, when it shares a process (the memory backend): they
        # close when it ends, as a process's exit closes them, so no caller hangs.
        self._accepted: weakref.WeakSet[ServerConnection] | None = None
        if own_process:
            # Handles made in this process route through this replica's runtime. A
            # replica sharing a process (the memory backend) leaves the driver's in place.
            set_current(self.runtime)
        else:
            self._accepted = weakref.WeakSet()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(4, min(64, self.config.max_ongoing_requests)),
            thread_name_prefix=f"fleet-{spec.deployment_name}")
        self.instance: Any = None
        self.is_function = False
        self._methods: dict[str, tuple[Any, str]] = {}
        self._slow: set[str] = set()      # methods whose last call took > SLOW_CALL_S
        self.tasks: dict[tuple[int, int], asyncio.Task[Any]] = {}
        self.ongoing = 0
        self.max_ongoing = self.config.max_ongoing_requests
        self.draining = False
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._grace = self.config.graceful_shutdown_timeout_s
        self.http: Any = None
        self.grpc: Any = None       # fleet/_replica/grpc.py, made on the first gRPC call
        # Connections of callers that sent model calls: told when the held models change.
        self._model_conns: set[ServerConnection] = set()
        self.models = _multiplex.ModelScope(self._models_changed)
        # This replica's metric cells (None when metrics are off): updated in place per
        # call, sent by the runtime every second.
        self.tracer = _otel.tracer("replica") if own_process else None
        self._processing: list[float] | None = None
        self._queue: list[float] = []
        self._errors: list[float] = []
        rec = self.runtime.metrics
        if rec is not None:
            names = ("application", "deployment", "replica")
            mine = (spec.app_name, spec.deployment_name, spec.replica_id)
            self._processing = rec.histogram(
                "fleet_replica_processing_seconds", names,
                count_name="fleet_replica_requests_total").cells(mine)
            self._queue = rec.histogram("fleet_replica_queue_seconds", names).cells(mine)
            self._errors = rec.counter("fleet_replica_errors_total", names).cells(mine)
            rec.gauge_fns.append(self._gauges)

    def _gauges(self, rec: Recorder) -> None:
        """Sent every second: the ongoing calls, and batch figures since the last time."""
        spec = self.spec
        mine = (("application", spec.app_name), ("deployment", spec.deployment_name),
                ("replica", spec.replica_id))
        rec.set("fleet_ongoing_requests", mine, self.ongoing)
        if self.instance is None:
            return
        names = ("application", "deployment", "replica")
        key = (spec.app_name, spec.deployment_name, spec.replica_id)
        for sizes, waits in take_batch_metrics(self.instance):
            for name, cells, buckets in (("fleet_batch_size", sizes, SIZE_BUCKETS),
                                         ("fleet_batch_wait_seconds", waits, TIME_BUCKETS)):
                have = rec.histogram(name, names, buckets).cells(key)
                for i, v in enumerate(cells):
                    have[i] += v

    # -- lifecycle ---------------------------------------------------------------
    async def run(self) -> int:
        rt = self.runtime
        rt.on_controller_lost = self._controller_lost
        rt.ctrl_hooks["health"] = self._on_health
        rt.ctrl_hooks["stop"] = self._on_stop
        rt.ctrl_hooks["reconfigure"] = self._on_reconfigure
        rt.ctrl_hooks["logging"] = self._on_logging
        await rt.connect_controller(subscribe=True)
        if self.spec.listen_host:
            # on a cluster node: TCP on the node's address, port chosen by the kernel
            server = await listen(self, self.spec.secret, f"tcp:{self.spec.listen_host}:0",
                                  self._accepted)
            address = f"tcp:{self.spec.listen_host}:{bound_port(server)}"
        else:
            sock_dir = os.path.dirname(self.spec.controller_address[5:])
            # a short name whatever the deployment's: a Unix socket's path has ~107 bytes
            address = f"unix:{sock_dir}/r-{secrets.token_hex(4)}.sock"
            server = await listen(self, self.spec.secret, address, self._accepted)
        try:
            return await self._serve_until_stopped(server, address)
        finally:
            if self._accepted is not None:
                server.close()
                for conn in list(self._accepted):
                    conn.close()

    async def _serve_until_stopped(self, server: asyncio.AbstractServer, address: str) -> int:
        rt = self.runtime
        try:
            await rt.call_controller("replica_starting", self.spec.replica_id,
                                     "constructor running")
            await self._construct()
        except BaseException as exc:  # noqa: BLE001 - reported to the controller
            # No traceback here: the controller gets it and the deployer shows it once.
            log.debug("constructor of %s failed", self.where, exc_info=True)
            await rt.call_controller("replica_failed", self.spec.replica_id,
                                     error_info(exc, f"while constructing {self.where}"))
            server.close()
            return 1
        await rt.announce("replica_ready", self.spec.replica_id, address, os.getpid())
        await self._stop.wait()
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), self._grace)
        except asyncio.TimeoutError:
            for task in list(self.tasks.values()):
                task.cancel()
        server.close()
        self.runtime.send_metrics()     # the calls of its last second count too
        await self.http.shutdown(self._grace or 1.0)
        self.models.close()
        await self._run_del()
        return 0

    async def _construct(self) -> None:
        from fleet._replica.http import HTTPAdapter
        blob = self.spec.serialized_def
        target, args, kwargs = await self.loop.run_in_executor(self.pool, cloudpickle.loads, blob)
        if hasattr(target, "load") and type(target).__name__ == "ClassRef":
            target = target.load()
        if inspect.isclass(target):
            instance = target(*args, **kwargs)
            if inspect.isawaitable(instance):  # pragma: no cover - unusual
                instance = await instance
            self.instance = instance
        else:
            self.is_function = True
            self.instance = functools.partial(target, *args, **kwargs) if (args or kwargs) \
                else target
        if not self.is_function:
            _multiplex.watch(self.instance, self.models)
        self.http = HTTPAdapter(self)
        await self.http.startup()       # an ingress app's lifespan
        if self.config.user_config is not None:
            await self._reconfigure(self.config.user_config)

    async def _reconfigure(self, user_config: Any) -> None:
        fn = getattr(self.instance, "reconfigure", None)
        if fn is None:
            if user_config is not None:
                raise TypeError(f"{self.where} got user_config but defines no "
                                "reconfigure(self, config) method")
            return
        await self.invoke(fn, (user_config,), {})

    async def _run_del(self) -> None:
        fn = getattr(type(self.instance), "__del__", None) if not self.is_function else None
        if fn is None:
            return
        try:
            result = fn(self.instance)
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, self._grace or 1.0)
        except asyncio.CancelledError:
            raise
        except BaseException:  # noqa: BLE001 - SystemExit from user code included
            log.exception("__del__ of %s raised", self.where)

    def request_stop(self) -> None:
        self._stop.set()

    def _controller_lost(self) -> None:
        # The instance is gone: leave promptly rather than linger as an orphan.
        self._grace = min(self._grace, 1.0)
        self._stop.set()

    # -- control messages -----------------------------------------------------------
    def _on_stop(self, msg: dict[str, Any]) -> None:
        self._grace = float(msg.get("timeout_s", self._grace))
        self.draining = True
        self._stop.set()

    def _on_health(self, msg: dict[str, Any]) -> None:
        self.loop.create_task(self._health(msg))

    async def _health(self, msg: dict[str, Any]) -> None:
        ok, error = True, ""
        fn = getattr(self.instance, "check_health", None) if not self.is_function else None
        if fn is not None:
            try:
                await asyncio.wait_for(self.invoke(fn, (), {}), float(msg.get("timeout_s", 30)))
            except asyncio.TimeoutError:
                ok, error = False, f"check_health did not return within {msg.get('timeout_s')}s"
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit from user code included
                ok, error = False, f"check_health raised {type(exc).__name__}: {exc}"
        self.runtime.send_ctrl({"type": "health_result", "id": msg.get("id"), "ok": ok,
                                "error": error, "replica_id": self.spec.replica_id,
                                "ongoing": self.ongoing, "batches": batch_stats(self.instance)})

    # -- multiplexed models ----------------------------------------------------------
    def _models_msg(self) -> ModelsMsg:
        return {"type": "models", "key": deployment_key(self.spec.app_name,
                                                        self.spec.deployment_name),
                "replica_id": self.spec.replica_id,
                "models": self.models.held_ids()}

    def _models_changed(self) -> None:
        """A loader loaded or evicted: tell the callers that route models here, and the
        controller (for status). Sent before the reply of the call that loaded."""
        msg = self._models_msg()
        for conn in self._model_conns:
            conn.ctrl(msg)
        self.runtime.send_ctrl({"type": "models", "replica_id": self.spec.replica_id,
                                "models": self.models.held()})

    def _model_call(self, conn: ServerConnection, model: str) -> None:
        if conn not in self._model_conns:
            self._model_conns.add(conn)
            # A new caller learns what is held already, and that this call's model is
            # coming here (its load starts with the call), so its next calls follow.
            msg = self._models_msg()
            models = msg.get("models", [])
            if model not in models:
                models.append(model)
            conn.ctrl(msg)

    def apply_logging(self, config: dict[str, Any] | None) -> None:
        """Apply the deployment's logging_config (at start, and when it changes)."""
        from fleet import _logs
        spec = self.spec
        _logs.apply(config, {"application": spec.app_name, "deployment": spec.deployment_name,
                             "replica": spec.replica_id})

    def _on_logging(self, msg: dict[str, Any]) -> None:
        self.apply_logging(msg.get("logging_config"))
        log.info("logging_config of %s applied: %s", self.where, msg.get("logging_config"))

    def _on_reconfigure(self, msg: dict[str, Any]) -> None:
        async def go() -> None:
            ok, error = True, ""
            try:
                await self._reconfigure(msg["user_config"])
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit from user code included
                ok, error = False, f"reconfigure raised {type(exc).__name__}: {exc}"
            self.runtime.send_ctrl({"type": "reconfigure_result", "id": msg.get("id"),
                                    "ok": ok, "error": error,
                                    "replica_id": self.spec.replica_id})
        self.loop.create_task(go())

    # -- methods ---------------------------------------------------------------------
    def method(self, name: str) -> tuple[Any, str]:
        """The bound method and its kind; MethodNotFoundError naming both if absent."""
        found = self._methods.get(name)
        if found is not None:
            return found
        if self.is_function:
            if name != "__call__":
                raise MethodNotFoundError(
                    f"deployment {self.spec.deployment_name!r} is a function and has only "
                    f"__call__, not a method {name!r}")
            fn = self.instance
        else:
            fn = getattr(self.instance, name, None) if not name.startswith("_") or \
                name == "__call__" else None
            if fn is None or not callable(fn):
                hint = ""
                if name == "__call__" and getattr(self.instance, "_fleet_asgi_app", None):
                    hint = ("; it serves an ASGI app (fleet.ingress): send HTTP requests to "
                            "its route, or call one of its methods (handle.name.remote())")
                raise MethodNotFoundError(
                    f"deployment {self.spec.deployment_name!r} has no method {name!r}{hint}")
        found = (fn, _kind(fn))
        self._methods[name] = found
        return found

    def http_method(self, name: str) -> tuple[Any, str]:
        """The method an HTTP request's call-method header names: ``__call__`` or a
        public method the deployment's class defines itself, never a lifecycle hook
        (``reconfigure``, ``check_health``), an attribute or a name starting with ``_``.
        Anything else is MethodNotFoundError, and nothing about the name is kept."""
        if name != "__call__" and (
                self.is_function or name.startswith("_") or name in LIFECYCLE_METHODS
                or not _defined_by_class(type(self.instance), name)):
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise MethodNotFoundError(
                f"deployment {self.spec.deployment_name!r} has no method {shown!r} that "
                "HTTP requests may call")
        return self.method(name)

    async def invoke(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     kind: str | None = None) -> Any:
        """Run fn: async methods on the loop, sync ones in the thread pool."""
        kind = kind or _kind(fn)
        if kind == ASYNC:
            return await fn(*args, **kwargs)
        if kind != SYNC:
            raise TypeError(f"method {getattr(fn, '__name__', fn)!r} of {self.where} is a "
                            "generator: call it with handle.options(stream=True)")
        ctx = contextvars.copy_context()
        result = await self.loop.run_in_executor(
            self.pool, functools.partial(ctx.run, _call_sync, fn, args, kwargs))
        if inspect.isawaitable(result):
            result = await result
        return result

    # -- the Handler protocol ------------------------------------------------------
    def on_call(self, conn: ServerConnection, call_id: int, method: str,
                args: tuple[Any, ...], kwargs: dict[str, Any], meta: CallMeta | None
                ) -> None:
        if self.ongoing >= self.max_ongoing or self.draining:
            # Each caller's router keeps at most max_ongoing_requests here, but several
            # callers (several proxies, handles) together can send more: the replica
            # holds the limit itself, and the caller's router tries again.
            conn.reply_error(call_id, ReplicaDrainingError(f"{self.where} is shutting down")
                             if self.draining else ReplicaFullError(
                                 f"{self.where} runs max_ongoing_requests="
                                 f"{self.max_ongoing} calls already"))
            return
        if meta is not None:
            if "grpc" in meta:
                from fleet._replica.grpc import adapter
                adapter(self).accept(conn, call_id, meta)
            if "model" in meta:
                self._model_call(conn, meta["model"])
        if self.tracer is not None:
            task = self.loop.create_task(self._traced(conn, call_id, method, args, kwargs,
                                                      meta, time.perf_counter()))
        else:
            task = self.loop.create_task(self._serve(conn, call_id, method, args, kwargs,
                                                     meta, time.perf_counter()))
        key = (id(conn), call_id)
        self.tasks[key] = task
        self.ongoing += 1
        self._idle.clear()
        task.add_done_callback(functools.partial(self._done, key))

    def _done(self, key: tuple[int, int], _task: asyncio.Task[Any]) -> None:
        self.tasks.pop(key, None)
        self.ongoing -= 1
        if self.ongoing == 0:
            self._idle.set()

    async def _serve(self, conn: ServerConnection, call_id: int, method: str,
                     args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: CallMeta | None, arrived: float = 0.0) -> None:
        if method in self._slow:
            # Replies of calls that finished in this loop iteration leave now: this
            # method took milliseconds last time and may block the loop (an async method
            # doing CPU work). Fast methods keep their replies coalesced into one write.
            conn.flush()
        started = time.perf_counter()
        if meta is not None:
            rid = meta.get("rid")
            if rid is not None:
                _context.set_request_id(rid)            # this task's context only
            tp = meta.get("tp")
            if tp is not None:
                _context.set_traceparent(tp)
            if "model" in meta:
                # this task's context only
                _multiplex.enter_call(meta["model"], self.models)
        try:
            if meta is not None and "http" in meta:
                await self.http.serve_http(conn, call_id, method, args[0], meta)
                return
            if meta is not None and "grpc" in meta:
                await self.grpc.serve(conn, call_id, method, args, meta)
                return
            fn, kind = self.method(method)
            if meta is not None or self.http.takes_request(method, fn):
                args, kwargs = self.http.adapt_args(method, fn, args, kwargs, meta)
                if meta is not None and meta.get("stream"):
                    await self._stream(conn, call_id, fn, kind, args, kwargs)
                    return
            conn.reply(call_id, await self.invoke(fn, args, kwargs, kind))
        except asyncio.CancelledError:
            return
        except BaseException as exc:  # noqa: BLE001 - goes back to the caller
            if self._processing is not None:
                self._errors[0] += 1
            conn.reply_error(call_id, exc, f"in {method} of {self.where}")
        finally:
            if conn.windows:
                conn.end_stream(call_id)
            elapsed = time.perf_counter() - started
            cells = self._processing
            if cells is not None:
                cells[bisect_left(TIME_BUCKETS, elapsed)] += 1
                cells[-1] += elapsed
                waited = started - arrived if arrived else 0.0
                queue = self._queue
                queue[bisect_left(TIME_BUCKETS, waited)] += 1
                queue[-1] += waited
            if elapsed <= SLOW_CALL_S:
                self._slow.discard(method)
            elif method in self._methods or method == "__call__":
                self._slow.add(method)      # names of real methods only: bounded

    async def _traced(self, conn: ServerConnection, call_id: int, method: str,
                      args: tuple[Any, ...], kwargs: dict[str, Any], meta: CallMeta | None,
                      arrived: float) -> None:
        """A call in a ``fleet.replica`` span, child of the caller's; its handle calls
        are the span's children."""
        assert self.tracer is not None
        spec = self.spec
        span = self.tracer.start_span(
            "fleet.replica", context=_otel.parent(meta.get("tp") if meta else None),
            attributes={"fleet.application": spec.app_name,
                        "fleet.deployment": spec.deployment_name,
                        "fleet.replica": spec.replica_id, "fleet.method": method})
        traced: CallMeta = dict(meta) if meta is not None else {}  # type: ignore[assignment]
        traced["tp"] = _otel.traceparent_of(span)
        try:
            await self._serve(conn, call_id, method, args, kwargs, traced, arrived)
        finally:
            span.end()

    async def _stream(self, conn: ServerConnection, call_id: int, fn: Any, kind: str,
                      args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kind == AGEN:
            agen = fn(*args, **kwargs)
            try:
                async for item in agen:
                    await conn.stream(call_id, item)
            finally:
                await agen.aclose()
        elif kind == GEN:
            gen = fn(*args, **kwargs)
            end = object()
            try:
                while True:
                    item = await self.loop.run_in_executor(self.pool, next, gen, end)
                    if item is end:
                        break
                    await conn.stream(call_id, item)
            finally:
                gen.close()
        else:
            result = await self.invoke(fn, args, kwargs, kind)
            if inspect.isasyncgen(result):
                async for item in result:
                    await conn.stream(call_id, item)
            elif inspect.isgenerator(result) or isinstance(result, list | tuple):
                for item in result:
                    await conn.stream(call_id, item)
            else:
                await conn.stream(call_id, result)
        conn.reply(call_id, None)

    def on_cancel(self, conn: ServerConnection, call_id: int) -> None:
        task = self.tasks.get((id(conn), call_id))
        if task is not None:
            task.cancel()

    def on_data(self, conn: ServerConnection, call_id: int, obj: Any, size: int) -> None:
        if self.grpc is not None and self.grpc.on_data(conn, call_id, obj, size):
            return
        if self.http is not None:
            self.http.on_data(conn, call_id, obj, size)

    def on_ctrl(self, conn: ServerConnection, msg: Any) -> None:
        pass

    def on_closed(self, conn: ServerConnection) -> None:
        # The caller is gone: its calls have no one to answer to.
        self._model_conns.discard(conn)
        cid = id(conn)
        for (c, _), task in list(self.tasks.items()):
            if c == cid:
                task.cancel()
