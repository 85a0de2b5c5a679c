"""The per-process runtime: the event loop fleet's calls run on, the controller
connection with its published tables, and one Router per deployment.

Every fleet process (driver, replica, proxy) has exactly one; handles find it with
:func:`current`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fleet import _metrics, _traffic
from fleet._context import current_request_id, current_traceparent
from fleet._router import Router, Slot
from fleet._types import CallMeta, ControlMessage, Tables, deployment_key
from fleet._wire import frames
from fleet._wire.channel import Channel, Pending, connect
from fleet.exceptions import (
    DeploymentFailedError,
    FleetError,
    ReplicaDiedError,
    ReplicaDrainingError,
    ReplicaFullError,
    RequestCancelledError,
    RequestTimeoutError,
)

log = logging.getLogger("fleet.runtime")

_current: Runtime | None = None
_current_lock = threading.Lock()
# The runtime of each instance that runs in this process, by the loop it runs on: code
# running on that loop (a replica of the memory backend, a coroutine the instance runs)
# reaches its own instance's runtime even when another instance started later. A plain
# dict (a weak one costs a weakref per lookup): an instance's shutdown removes its entry.
_bound: dict[asyncio.AbstractEventLoop, Runtime] = {}

MAX_ATTEMPTS = 4
# How long a process under a restarting controller looks for it before giving up, and
# how often it asks.
REJOIN_S = 120.0
REJOIN_RETRY_S = 0.25
# How often callers report their load on autoscaling deployments to the controller.
LOAD_REPORT_S = 0.5


# How a driver starts an instance when a handle is used before fleet.start(): the
# public layer registers it (this module sits below it and never imports it).
_starter: Callable[[], object] | None = None


def set_starter(start: Callable[[], object]) -> None:
    """Register what :func:`current` calls when no runtime runs in this process."""
    global _starter
    _starter = start


def current() -> Runtime:
    """The runtime of the instance whose loop runs the caller, else this process's
    runtime; in a driver, starts an instance if none runs."""
    # With one instance (or none) in the process, it is the process's: the loop is looked
    # up only where several run side by side (tests), off the common handle path.
    if len(_bound) > 1:
        loop = asyncio._get_running_loop()
        if loop is not None:
            found = _bound.get(loop)
            if found is not None:
                return found
    rt = _current
    if rt is not None:
        return rt
    if _starter is None:
        raise FleetError("no fleet runtime runs in this process: import fleet and call "
                         "fleet.start() (or fleet.run(app)) before using a handle")
    _starter()
    assert _current is not None
    return _current


# Satellites of this process's runtimes, by id() of the loop each runs on (see
# for_caller). Weak: a satellite lives as long as its loop holds its connections or a
# call holds it, and goes with a loop that is dropped without being closed.
_satellites: weakref.WeakValueDictionary[int, Runtime] = weakref.WeakValueDictionary()


def for_caller(rt: Runtime) -> Runtime:
    """The runtime a call made now goes through: rt, or, when the caller runs an event
    loop of its own (a driver's ``asyncio.run`` code, a web app calling fleet) and rt
    allows it, a satellite of rt on that loop.

    Why: a call through rt from another loop crosses threads twice (to rt's loop and
    back), and both threads contend for the GIL; a satellite is a runtime like a
    proxy's, with its own subscription to the tables, routers and replica connections,
    so the caller's calls never leave its loop. It is made on the loop's first call
    (calls wait for its tables), and retires when the loop shuts down (an async
    generator it starts there is closed then), when its controller goes away, or when
    rt's instance stops or this process detaches from it. While rt's own connection to
    the controller is down (a restarting controller), calls go through rt, which waits
    for it to come back."""
    loop = asyncio._get_running_loop()
    if loop is None or loop is rt.loop or not rt.satellites:
        return rt
    sat = _satellites.get(id(loop))
    if sat is not None and sat.loop is loop and sat.parent is rt and not sat.retired:
        return sat
    ch = rt.controller
    if ch is None or ch.closed or rt._rejoining is not None:
        return rt
    sat = Runtime(loop, rt.controller_address, rt.secret)
    sat.parent = rt
    sat.on_controller_lost = functools.partial(
        sat.retire, "fleet's controller went away: the instance was shut down or its "
                    "driver exited")
    sat._joining = loop.create_task(sat._join())
    with _current_lock:
        _satellites[id(loop)] = sat
        rt._satellites_of.add(sat)
    return sat


def retire_satellites(rt: Runtime, why: str) -> None:
    """Retire rt's satellites, each on its own loop (from any thread)."""
    for sat in list(rt._satellites_of):
        try:
            sat.loop.call_soon_threadsafe(sat.retire, why)
        except RuntimeError:            # its loop is closed: nothing runs there any more
            sat.retired = why


async def _close_with_loop(rt: Runtime) -> AsyncIterator[None]:
    """Started on a satellite's loop: closed by the loop's shutdown_asyncgens (as
    ``asyncio.run`` ends), which retires the satellite with its connections."""
    try:
        yield
    finally:
        rt.retire("the event loop that made the call was shut down")


def set_current(rt: Runtime | None) -> None:
    global _current
    with _current_lock:
        _current = rt


def bind(rt: Runtime) -> None:
    """An instance started in this process: calls made on its loop use rt, and so do
    this process's other calls (the newest instance is the process's)."""
    global _current
    with _current_lock:
        _bound[rt.loop] = rt
        _current = rt


def unbind(rt: Runtime) -> None:
    """rt's instance stopped: it is no one's runtime any more. When it was the
    process's, the process's is the newest instance still running, if any."""
    global _current
    retire_satellites(rt, "the fleet instance was shut down, or this process detached "
                          "from it")
    with _current_lock:
        if _bound.get(rt.loop) is rt:
            del _bound[rt.loop]
        if _current is rt:
            _current = list(_bound.values())[-1] if _bound else None


class Runtime:
    """Tables, routers and connections of one process, all owned by one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, controller_address: str,
                 secret: bytes) -> None:
        self.loop = loop
        self.controller_address = controller_address
        self.secret = secret
        self.tables: Tables | None = None
        self.routers: dict[str, Router] = {}
        self.controller: Channel | None = None
        self._tables_changed = asyncio.Event()
        self.ctrl_hooks: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.on_controller_lost: Callable[[], None] | None = None
        # Under a controller that restarts (a detached one on Ray): where it answers now,
        # asked again when the connection to it closes; and the calls that say who this
        # process is (a replica's replica_ready, a proxy's proxy_ready), made again to the
        # controller it rejoins. on_controller_lost runs only when rejoining fails.
        self.find_controller: Callable[[], Awaitable[str]] | None = None
        self.announced: dict[str, tuple[Any, ...]] = {}
        self.rejoin_s = REJOIN_S
        self._rejoining: asyncio.Task[None] | None = None
        self._any_version = False       # a restarted controller counts its tables anew
        self.table_listeners: list[Callable[[Tables], None]] = []
        # Acks let the controller drain a replica only after callers stopped routing to it.
        self.ack_tables = True
        self.caller_id = f"{os.getpid()}-{id(self):x}"
        self._autoscaled: set[str] = set()
        self._report_timer: asyncio.TimerHandle | None = None
        # shadow copies of traffic in flight from this runtime (bounded by _traffic)
        self.shadows: set[asyncio.Task[None]] = set()
        # This process's metrics (None when FLEET_METRICS=0), sent to the controller
        # every PUSH_S once connected and subscribed.
        self.metrics: _metrics.Recorder | None = None
        self._handle_calls: _metrics.Family | None = None
        if _metrics.enabled():
            self.metrics = _metrics.Recorder()
            self._handle_calls = self.metrics.counter("fleet_handle_requests_total",
                                                      ("application", "deployment"))
            self.metrics.gauge_fns.append(self._router_gauges)
        self._push_timer: asyncio.TimerHandle | None = None
        # May callers on other loops use a satellite of this runtime (for_caller)? Set
        # by a driver's instance on a backend with real connections.
        self.satellites = False
        self.parent: Runtime | None = None          # a satellite's runtime
        self._satellites_of: weakref.WeakSet[Runtime] = weakref.WeakSet()
        self.retired = ""                           # why a satellite stopped
        self._joining: asyncio.Task[None] | None = None
        self._sentinel: AsyncIterator[None] | None = None

    # -- a satellite (for_caller) --------------------------------------------------
    async def _join(self) -> None:
        self._sentinel = _close_with_loop(self)
        await self._sentinel.__anext__()
        try:
            await self.connect_controller(subscribe=True)
        except (OSError, ConnectionError, FleetError) as exc:
            self.retire(f"cannot reach fleet's controller at {self.controller_address}: "
                        f"{exc}")
        finally:
            self._joining = None

    async def until_joined(self) -> None:
        """A satellite's first calls wait for its tables (the deployment's replicas,
        traffic policies, whether the deployment exists); FleetError when it failed."""
        task = self._joining
        if task is not None:
            await asyncio.wait({task})      # (it retires the satellite when it fails)
        if self.retired:
            raise FleetError(self.retired)

    def retire(self, why: str) -> None:
        """Stop a satellite (on its loop): fail its waiting calls (and later ones) with
        why, close its connections; the loop's next call makes a new one."""
        if self.retired:
            return
        self.retired = why
        with _current_lock:
            if _satellites.get(id(self.loop)) is self:
                del _satellites[id(self.loop)]
        if self.loop.is_closed():
            return
        if self._joining is not None and self._joining is not asyncio.current_task():
            self._joining.cancel()
        for timer in (self._push_timer, self._report_timer):
            if timer is not None:
                timer.cancel()
        if self.controller is not None and not self.controller.closed:
            self.send_metrics()         # the calls of its last second count too
        self.close(why)
        for router in self.routers.values():
            for slot in router.slots:
                if slot.channel is not None:
                    slot.channel.close()
        if self.controller is not None:
            self.controller.close()

    # -- controller --------------------------------------------------------------
    async def connect_controller(self, subscribe: bool = True) -> None:
        self.controller = await connect(self.controller_address, self.secret,
                                        on_ctrl=self._on_ctrl, on_closed=self._lost)
        if subscribe:
            await self.call_controller("subscribe")
            await self.wait_tables(0)
            if self.metrics is not None and self._push_timer is None:
                self._push_timer = self.loop.call_later(_metrics.PUSH_S, self._push_metrics)

    def _push_metrics(self) -> None:
        """Send what this process counted in the last second (a timer, never per call)."""
        self._push_timer = None
        ch = self.controller
        if ch is None or ch.closed or self.metrics is None:
            return
        self.send_metrics()
        self._push_timer = self.loop.call_later(_metrics.PUSH_S, self._push_metrics)

    def send_metrics(self) -> None:
        """Send this process's figures now (a stopping replica does, so its last
        second counts)."""
        if self.metrics is None:
            return
        taken = self.metrics.take()
        self.send_ctrl({"type": "metrics", "source": self.caller_id,
                        "counters": taken["counters"], "hists": taken["hists"],
                        "gauges": taken["gauges"]})

    def _router_gauges(self, rec: _metrics.Recorder) -> None:
        """Calls this process holds in its routers' queues, per deployment."""
        for router in self.routers.values():
            rec.set("fleet_queued_requests", (("application", router.app),
                                              ("deployment", router.deployment)),
                    len(router.queue))

    def _lost(self, ch: Channel) -> None:
        if ch is not self.controller:
            return              # an earlier connection, replaced by a rejoin
        if self.find_controller is not None:
            if self._rejoining is None:     # (else the rejoin under way tries again)
                self._rejoining = self.loop.create_task(self._rejoin())
            return
        if self.on_controller_lost is not None:
            self.on_controller_lost()

    def stop_rejoining(self) -> None:
        """The controller is going away for good (this process shuts it down, or
        detaches): do not look for it again."""
        self.find_controller = None
        task, self._rejoining = self._rejoining, None
        if task is not None:
            task.cancel()

    async def _rejoin(self) -> None:
        """Find the restarted controller, connect, subscribe and announce again; keep
        serving meanwhile with the tables this process has. Gives up after rejoin_s."""
        assert self.find_controller is not None
        deadline = self.loop.time() + self.rejoin_s
        why = ""
        try:
            while self.loop.time() < deadline and self.find_controller is not None:
                try:
                    await asyncio.wait_for(self._join_again(),
                                           max(0.1, deadline - self.loop.time()))
                    log.info("rejoined fleet's controller at %s", self.controller_address)
                    return
                except (OSError, ConnectionError, FleetError, asyncio.TimeoutError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(REJOIN_RETRY_S)
        finally:
            self._rejoining = None
        log.warning("fleet's controller did not come back within %g s (%s)", self.rejoin_s,
                    why or "no answer")
        if self.on_controller_lost is not None:
            self.on_controller_lost()

    async def _join_again(self) -> None:
        assert self.find_controller is not None
        self.controller_address = await self.find_controller()
        self._any_version = True
        await self.connect_controller(subscribe=True)
        for method, args in list(self.announced.items()):
            await self.call_controller(method, *args)

    async def call_controller(self, method: str, *args: Any, **kwargs: Any) -> Any:
        ch = self.controller
        rejoining = self._rejoining
        if (ch is None or ch.closed) and rejoining is not None \
                and asyncio.current_task() is not rejoining:
            # the controller is restarting: wait for it rather than fail (bounded by the
            # rejoin's own deadline)
            await asyncio.wait({rejoining}, timeout=self.rejoin_s)
            ch = self.controller
        if ch is None or ch.closed:
            raise FleetError("fleet's controller is not reachable: the instance was shut "
                             "down or its driver exited")
        return await ch.call(method, args, kwargs, None).result()

    async def announce(self, method: str, *args: Any) -> Any:
        """call_controller, made again (the latest arguments) to a controller this
        process rejoins after it restarted."""
        self.announced[method] = args
        return await self.call_controller(method, *args)

    def send_ctrl(self, msg: ControlMessage) -> None:
        if self.controller is not None:
            self.controller.send(frames.encode(frames.CTRL, 0, msg))

    def _on_ctrl(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "tables":
            self.apply_tables(msg["tables"])
            return
        hook = self.ctrl_hooks.get(str(kind))
        if hook is not None:
            hook(msg)

    def apply_tables(self, tables: Tables) -> None:
        if self.tables is not None and tables["version"] <= self.tables["version"] \
                and not self._any_version:
            return
        self._any_version = False
        self.tables = tables
        deps = tables["deployments"]
        for key, router in self.routers.items():
            router.update(deps.get(key))
        self._autoscaled = {k for k, t in deps.items() if t.get("autoscaling")}
        self._schedule_reports()
        for listener in self.table_listeners:
            listener(tables)
        if self.ack_tables:
            self.send_ctrl({"type": "tables_ack", "version": tables["version"]})
        self._tables_changed.set()
        self._tables_changed = asyncio.Event()

    async def wait_tables(self, version: int) -> Tables:
        """Wait for a table newer than version (or any, for 0)."""
        while self.tables is None or self.tables["version"] <= version - 1 \
                or self._any_version:
            await self._tables_changed.wait()
        return self.tables

    # -- routing ----------------------------------------------------------------
    def router(self, app: str, deployment: str) -> Router:
        key = deployment_key(app, deployment)
        router = self.routers.get(key)
        if router is None:
            router = Router(key, self._connect_replica)
            if self.tables is not None:
                router.update(self.tables["deployments"].get(key))
            self.routers[key] = router
            self._schedule_reports()
        return router

    def close(self, why: str) -> None:
        """Fail every call still waiting for a replica, now and later (the instance is
        stopping: nothing will free one)."""
        for router in self.routers.values():
            router.close(why)

    # -- load reports for the autoscaler (a timer, never per call) -------------------
    def _schedule_reports(self) -> None:
        if self._report_timer is None and self._autoscaled.intersection(self.routers):
            self._report_timer = self.loop.call_later(LOAD_REPORT_S, self._report_loads)

    def _report_loads(self) -> None:
        self._report_timer = None
        for key in self._autoscaled.intersection(self.routers):
            self.report_load(self.routers[key])
        self._schedule_reports()

    def report_load(self, router: Router) -> None:
        """Tell the controller this caller's in-flight and queued calls to router's
        deployment."""
        ch = self.controller
        if ch is None or ch.closed:
            return
        stats = router.stats()
        self.send_ctrl({"type": "load", "key": router.key, "caller": self.caller_id,
                        "inflight": stats["inflight"], "queued": stats["queued"]})

    async def _connect_replica(self, address: str, peer: str) -> Channel:
        return await connect(address, self.secret, peer=peer, on_ctrl=self._on_replica_ctrl)

    def _on_replica_ctrl(self, msg: dict[str, Any]) -> None:
        # A replica of a multiplexed deployment tells which models it now holds.
        if msg.get("type") == "models":
            router = self.routers.get(msg.get("key", ""))
            if router is not None:
                router.set_models(msg["replica_id"], msg["models"])

    def _check_known(self, router: Router) -> None:
        if not router.known and self.tables is not None:
            apps = {k.partition("#")[0] for k in self.tables["deployments"]}
            if router.app not in apps:
                raise FleetError(f"no application named {router.app!r} is running; "
                                 f"running: {sorted(apps) or 'none'}")
            raise FleetError(f"application {router.app!r} has no deployment named "
                             f"{router.deployment!r}")

    async def start_call(self, router: Router, method: str, args: tuple[Any, ...],
                         kwargs: dict[str, Any], meta: CallMeta | None,
                         stream: bool,
                         on_queue: Callable[[asyncio.Future[Slot]], None] | None = None
                         ) -> tuple[Slot, Pending]:
        """Pick a replica and send the call; retries calls that never reached one.
        on_queue: see :meth:`Router.acquire`."""
        self._check_known(router)
        if not router.slots and router.key in self._autoscaled:
            # No replica to take the call (scaled to zero): report once the call is
            # queued, so the controller starts one without waiting for the timer.
            self.loop.call_soon(self.report_load, router)
        last: BaseException | None = None
        model = meta.get("model") if meta is not None else None
        for _ in range(MAX_ATTEMPTS):
            slot = await router.acquire(model, on_queue)
            try:
                ch = await router.channel(slot)
                return slot, ch.call(method, args, kwargs, meta, stream)
            except (OSError, ReplicaDiedError) as exc:
                router.release(slot)
                router.drop(slot)
                last = exc
            except BaseException:
                router.release(slot)
                raise
        raise ReplicaDiedError(f"could not reach a replica of deployment {router.deployment!r} "
                               f"(application {router.app!r}) after {MAX_ATTEMPTS} tries: "
                               f"{last}")

    async def call(self, app: str, deployment: str, opts: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        """One handle call, start to finish (arguments already resolved)."""
        if self.retired:
            raise FleetError(self.retired)
        if self.tables is None and self.parent is not None:
            await self.until_joined()
        meta = _meta(opts)
        if self._handle_calls is not None:
            self._handle_calls.inc((app, deployment))
        if opts.follow_traffic and self.tables is not None and self.tables["traffic"]:
            app, deployment = _traffic.route_handle(self, app, deployment, opts.method_name,
                                                    args, kwargs, meta, False)
        router = self.router(app, deployment)
        if opts.timeout_s is None:
            return await self._call_once(router, opts.method_name, args, kwargs, meta)
        try:
            return await asyncio.wait_for(
                self._call_once(router, opts.method_name, args, kwargs, meta), opts.timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"call to {deployment}.{opts.method_name} (application {app!r}) did not "
                f"finish within timeout_s={opts.timeout_s}; it was cancelled") from None

    async def _call_once(self, router: Router, method: str, args: tuple[Any, ...],
                         kwargs: dict[str, Any], meta: CallMeta | None) -> Any:
        drained = 0
        while True:
            slot, pending = await self.start_call(router, method, args, kwargs, meta, False)
            try:
                return await pending.result()
            except asyncio.CancelledError:
                pending.cancel()
                raise
            except ReplicaFullError:
                router.refused(slot)        # waits its turn again, like a queued call
            except ReplicaDrainingError:
                router.drop(slot)
                drained += 1
                if drained == MAX_ATTEMPTS:
                    raise ReplicaDiedError(f"deployment {router.deployment!r}: every replica "
                                           "tried was shutting down") from None
            finally:
                router.release(slot)

    def retry_elsewhere(self, router: Router, slot: Slot, exc: BaseException) -> bool:
        """Whether a call the replica refused should be sent again: a draining replica is
        not chosen again by this router until the tables list it anew, a full one not
        for a moment (``Router.refused``)."""
        if isinstance(exc, ReplicaFullError):
            router.refused(slot)
            return True
        if isinstance(exc, ReplicaDrainingError):
            router.drop(slot)
            return True
        return False

    async def open_stream(self, app: str, deployment: str, opts: Any, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> Stream:
        if self.retired:
            raise FleetError(self.retired)
        if self.tables is None and self.parent is not None:
            await self.until_joined()
        meta = _meta(opts) or {}
        meta["stream"] = True
        if self._handle_calls is not None:
            self._handle_calls.inc((app, deployment))
        if opts.follow_traffic and self.tables is not None and self.tables["traffic"]:
            app, deployment = _traffic.route_handle(self, app, deployment, opts.method_name,
                                                    args, kwargs, meta, True)
        router = self.router(app, deployment)
        slot, pending = await self.start_call(router, opts.method_name, args, kwargs, meta, True)
        return Stream(router, slot, pending, functools.partial(
            self.start_call, router, opts.method_name, args, kwargs, meta, True))


class Stream:
    """A streaming call in progress; holds its replica slot until the end."""

    def __init__(self, router: Router, slot: Slot, pending: Pending,
                 restart: Callable[[], Awaitable[tuple[Slot, Pending]]] | None = None
                 ) -> None:
        self._router = router
        self._slot: Slot | None = slot
        self._pending = pending
        # Sends the call again while the replica refused it unstarted (full, draining).
        self._restart = restart
        self._drained = 0

    def _finish(self) -> None:
        if self._slot is not None:
            self._router.release(self._slot)
            self._slot = None

    async def next_item(self, end: Any) -> Any:
        while True:
            slot = self._slot
            if slot is None:
                return end
            try:
                kind, value = await self._pending.next()
            except asyncio.CancelledError:
                self.close()
                raise
            except ReplicaDrainingError as exc:
                self._finish()
                if self._restart is None or self._refused(slot, exc):
                    raise
                self._slot, self._pending = await self._restart()
                continue
            except BaseException:
                self._finish()
                raise
            break
        self._restart = None        # an item came: the call runs, and is not sent again
        if kind == frames.OK:
            self._finish()
            return end
        return value

    def _refused(self, slot: Slot, exc: ReplicaDrainingError) -> bool:
        """Note a refusal with the router; whether to give up (drained too often)."""
        if isinstance(exc, ReplicaFullError):
            self._router.refused(slot)
            return False
        self._router.drop(slot)
        self._drained += 1
        return self._drained >= MAX_ATTEMPTS

    def close(self) -> None:
        if self._slot is not None:
            self._pending.cancel()
            self._finish()


def _meta(opts: Any) -> CallMeta | None:
    rid = current_request_id()
    tp = current_traceparent()
    if opts.http_headers or opts.multiplexed_model_id or rid is not None or tp is not None:
        meta: CallMeta = {}
        if opts.http_headers:
            meta["http_headers"] = opts.http_headers
        if opts.multiplexed_model_id:
            meta["model"] = opts.multiplexed_model_id
        if rid is not None:
            meta["rid"] = rid       # the request this call serves (fleet.get_request_id)
        if tp is not None:
            meta["tp"] = tp         # its W3C trace context
        return meta
    return None


__all__ = ["DeploymentFailedError", "RequestCancelledError", "Runtime", "current"]
