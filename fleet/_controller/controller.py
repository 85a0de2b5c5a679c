"""The controller: owns desired state and reconciles replicas toward it.

It is never on the request path. Callers learn where replicas are from the tables it
publishes (versioned snapshots pushed to every subscriber on change, the whole table
on subscribe, so a restarted subscriber catches up at once).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

from fleet._controller import traffic, views
from fleet._controller.history import Events, Revisions
from fleet._controller.metrics import Store, summary
from fleet._controller.state import AppState, DeploymentState, ReplicaRecord
from fleet._plan import DeploymentPlan
from fleet._signals import stop_signalled
from fleet._types import (
    Backend,
    ControlMessage,
    DeploymentStatus,
    ErrorInfo,
    HealthResultMsg,
    LoadMsg,
    ReconfigureResultMsg,
    ReplicaSpec,
    ReplicaState,
    RequestErrorMsg,
    Tables,
    TablesMsg,
)
from fleet._wire.listener import ServerConnection
from fleet.exceptions import DeploymentFailedError, FleetError

log = logging.getLogger("fleet.controller")

TICK_S = 0.2
MAX_START_FAILURES = 3
# How long fleet.run and fleet.delete wait for connected proxies to apply new routes (and
# fleet.run for the gRPC proxy to open the port a driver asked for).
PROXY_CATCH_UP_S = 30.0
# How much of a request error's message and traceback status keeps.
ERROR_TEXT_MAX = 8192
# A replica leaves the routing tables before it is told to drain; subscribers get this
# long to confirm they stopped routing to it.
UNROUTE_WAIT_S = 1.0
# During a rolling update, at most this fraction of the target (at least one) starts at once.
ROLLING_SURGE = 0.25


class Controller:
    """Desired state, reconcile loop and table publisher (a listener Handler)."""

    def __init__(self, backend: Backend, secret: bytes, address: str, sys_path: list[str],
                 cwd: str) -> None:
        self.backend = backend
        self.secret = secret
        self.address = address
        self.sys_path = sys_path
        self.cwd = cwd
        self.apps: dict[str, AppState] = {}
        self.subscribers: set[ServerConnection] = set()
        self.version = 0
        self._published: Any = None
        self._kick = asyncio.Event()
        self._changed = asyncio.Event()
        self._deploying: dict[str, int] = {}    # app -> calls waiting for it to be ready
        self.on_shutdown_request: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[Any]] = set()
        self.proxies: dict[str, dict[str, Any]] = {}
        self._proxy_parts: dict[str, dict[int, dict[str, Any]]] = {}   # kind -> index -> info
        self._proxy_waiters: dict[str, asyncio.Future[Any]] = {}
        self._proxy_nodes: dict[tuple[str, int], str] = {}     # (kind, index) -> node id
        # (kind, index) -> the connection of the proxy that reported it (the latest one)
        self._proxy_conns: dict[tuple[str, int], ServerConnection] = {}
        self.traffic: dict[str, Any] = {}
        self._closing = False
        # Set from any thread once the instance is about to shut down (a stop signal
        # reached its process): replicas that exit from then on, as the ones a signal to
        # the whole process group stops, are not replaced nor reported as failures.
        self.going_down = False
        # Open Inference Protocol models unloaded through the repository extension:
        # model -> the deploy call that brings it back.
        self._unloaded: dict[str, tuple[str, str | None, list[DeploymentPlan], str]] = {}
        # Every process's metrics, merged, with their history (fleet/_controller/metrics.py).
        self.metrics = Store()
        self._metric_sources: dict[int, str] = {}      # id(conn) -> its metrics source
        # id(conn) -> the (deployment key, caller) pairs whose load it reported
        self._load_callers: dict[int, set[tuple[str, str]]] = {}
        self._next_sample = time.monotonic()
        self.logs_dir = ""          # the instance's log directory (fleet/_logs.py)
        # the instance's logging_config: a deployment that sets none gets this one
        self.logging_config: dict[str, Any] | None = None
        self.events = Events()
        self.revisions = Revisions()
        # Called (on the loop) when what a checkpoint records changed, when the instance
        # keeps one (a detached controller on Ray: fleet/_controller/checkpoint.py).
        self.on_state_change: Callable[[], None] | None = None
        self._state_key: Any = None

    # -- loop -------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def kick(self) -> None:
        self._kick.set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _loop(self) -> None:
        # A flag, not only cancel(): wait_for can swallow a cancel racing a kick.
        while not self._closing:
            try:
                await asyncio.wait_for(self._kick.wait(), TICK_S)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            try:
                await self._reconcile_all()
                self._publish()
                if self.on_state_change is not None:
                    self._check_state()
            except Exception:
                log.exception("reconcile failed")
            if time.monotonic() >= self._next_sample:
                self._next_sample = time.monotonic() + 1.0
                try:
                    self.sample_metrics()
                except Exception:
                    log.exception("sampling metrics failed")

    def _check_state(self) -> None:
        """Call on_state_change when what a checkpoint records changed."""
        from fleet._controller import checkpoint
        now = checkpoint.key(self)
        if now != self._state_key:
            self._state_key = now
            assert self.on_state_change is not None
            self.on_state_change()

    def restore_plan(self, app: AppState, plan: DeploymentPlan, target: int) -> None:
        """A recovered deployment, at the replica count it had (checkpoint.restore)."""
        self._apply_plan(app, plan)
        dep = app.deployments[plan.name]
        dep.target = dep.autoscaler.clamp(target) if dep.autoscaler is not None else target

    def sample_metrics(self) -> None:
        """The controller's own gauges, then one sample of every series into the
        history (once a second, from the reconcile loop)."""
        own: dict[Any, float] = {}
        now = time.monotonic()
        for app in self.apps.values():
            for dep in app.deployments.values():
                base = (("application", app.name), ("deployment", dep.name))
                counts: dict[str, int] = {}
                for rec in dep.replicas.values():
                    counts[rec.state.value] = counts.get(rec.state.value, 0) + 1
                for state, n in counts.items():
                    own[("fleet_replicas", base + (("state", state),))] = n
                own[("fleet_autoscaling_target_replicas", base)] = dep.target
                own[("fleet_autoscaling_desired_replicas", base)] = \
                    dep.autoscaler.desired(now) if dep.autoscaler is not None else dep.target
        self.metrics.set_own(own)
        self.metrics.sample()

    def _count(self, name: str, dep: DeploymentState, rec: ReplicaRecord | None = None
               ) -> None:
        labels: tuple[tuple[str, str], ...] = (("application", dep.app),
                                               ("deployment", dep.name))
        if rec is not None:
            labels += (("replica", rec.replica_id),)
        self.metrics.inc(name, labels)

    def is_going_down(self) -> bool:
        """Whether the instance is about to shut down (see ``going_down``)."""
        if not self.going_down and stop_signalled():
            self.going_down = True
        return self.going_down

    async def _reconcile_all(self) -> None:
        if self.is_going_down():   # shutdown() stops what runs; nothing new starts
            return
        now = time.monotonic()
        for app in list(self.apps.values()):
            for dep in list(app.deployments.values()):
                self._check_replicas(dep, now)
                if dep.plan.config.is_driver_deployment and not dep.deleting:
                    dep.target = len(self.backend.nodes())      # one replica per node
                if dep.autoscaler is not None and not dep.deleting:
                    dep.autoscaler.tick(self, dep, now)
                await self._reconcile(dep)
            if app.deleting and not any(d.replicas for d in app.deployments.values()):
                del self.apps[app.name]
                self._notify()

    def _check_replicas(self, dep: DeploymentState, now: float) -> None:
        cfg = dep.plan.config
        for rec in list(dep.replicas.values()):
            if rec.state == ReplicaState.STOPPING:
                continue
            if rec.proc is not None and not self.backend.alive(rec.proc):
                self._replica_gone(dep, rec, "the replica process exited")
                continue
            if rec.state == ReplicaState.STARTING and rec.proc is not None \
                    and rec.proc.pending():
                rec.pending_until = now     # startup_timeout_s counts once it is placed
                continue
            if rec.state == ReplicaState.STARTING and not rec.stopping \
                    and now - max(rec.started_at, rec.pending_until) > cfg.startup_timeout_s:
                self._start_timed_out(dep, rec)
                continue
            if rec.rejoin_by and rec.conn is None and now > rec.rejoin_by:
                self._replica_gone(dep, rec, "it did not reconnect to the controller after "
                                             "the controller restarted")
                continue
            if rec.state != ReplicaState.RUNNING or rec.conn is None:
                continue
            if rec.health_sent is not None:
                if now - rec.health_sent > cfg.health_check_timeout_s:
                    self._unhealthy(dep, rec, f"check_health did not answer within "
                                              f"health_check_timeout_s={cfg.health_check_timeout_s}")
            elif now - rec.last_health >= cfg.health_check_period_s:
                rec.health_id += 1
                rec.health_sent = now
                rec.conn.ctrl({"type": "health", "id": rec.health_id,
                               "timeout_s": cfg.health_check_timeout_s})

    async def _reconcile(self, dep: DeploymentState) -> None:
        if dep.deleting:
            for rec in dep.live():
                self._stop(dep, rec)
            return
        version = dep.plan.version
        cur = dep.live(version)
        old = [r for r in dep.live() if r.version != version]
        target = dep.target
        if dep.status != DeploymentStatus.DEPLOY_FAILED:
            missing = target - len(cur)
            if old and missing > 0:
                starting = len([r for r in cur if r.state == ReplicaState.STARTING])
                missing = min(missing, max(1, math.ceil(target * ROLLING_SURGE)) - starting)
            for _ in range(missing):
                await self._start(dep)
        if len(cur) > target:
            extras = sorted(cur, key=lambda r: (r.state == ReplicaState.RUNNING, r.started_at))
            for rec in extras[:len(cur) - target]:
                self._stop(dep, rec)
        running_new = len([r for r in dep.live(version) if r.state == ReplicaState.RUNNING])
        if old:
            keep = max(0, target - running_new)
            if dep.status == DeploymentStatus.DEPLOY_FAILED:
                keep = len(old)
            old.sort(key=lambda r: (r.state == ReplicaState.RUNNING, -r.started_at))
            for rec in old[:max(0, len(old) - keep)]:
                self._stop(dep, rec)
        if dep.status != DeploymentStatus.DEPLOY_FAILED:
            healthy = running_new >= target \
                and not [r for r in dep.live() if r.version != version] \
                and not any(r.reconfiguring for r in dep.replicas.values())
            status = DeploymentStatus.HEALTHY if healthy else DeploymentStatus.UPDATING
            if status != dep.status:
                if healthy:
                    self.events.add("deployment_healthy", dep.app, dep.name, "",
                                    f"{running_new} replica(s) running")
                dep.status = status
                dep.message = "" if healthy else dep.message
                self._notify()

    async def _start(self, dep: DeploymentState) -> None:
        rid = f"{dep.name}-{secrets.token_hex(3)}"
        rec = ReplicaRecord(replica_id=rid, version=dep.plan.version,
                            user_config=dep.plan.config.user_config)
        dep.replicas[rid] = rec
        config = dep.plan.config.model_dump()
        config["logging_config"] = self._logging_of(dep.plan)
        spec = ReplicaSpec(replica_id=rid, app_name=dep.app, deployment_name=dep.name,
                           version=dep.plan.version, serialized_def=dep.plan.serialized_def,
                           config=config,
                           controller_address=self.address, secret=self.secret,
                           sys_path=self._app_sys_path(dep.app), cwd=self._app_cwd(dep.app),
                           logs_dir=self.logs_dir)
        try:
            rec.proc = await self.backend.start_replica(spec)
        except Exception as exc:
            del dep.replicas[rid]
            self._fail(dep, f"could not start a replica: {exc}")
            return
        rec.pid = rec.proc.pid
        self._count("fleet_replica_starts_total", dep)
        log.info("starting replica %s of %s/%s", rid, dep.app, dep.name)

    def _stop(self, dep: DeploymentState, rec: ReplicaRecord) -> None:
        """Drain a replica: out of the tables first, then finish its calls, then exit."""
        if rec.state in (ReplicaState.STOPPING, ReplicaState.DEAD) or rec.stopping:
            return
        rec.stopping = True
        routed = rec.state in (ReplicaState.RUNNING, ReplicaState.UNHEALTHY) \
            and rec.conn is not None
        starting = rec.state == ReplicaState.STARTING
        if rec.state != ReplicaState.UNHEALTHY:
            rec.state = ReplicaState.STOPPING
        timeout = dep.plan.config.graceful_shutdown_timeout_s
        if starting:
            # no calls to finish: a constructor that ignores SIGTERM is killed after 1 s
            timeout = min(timeout, 1.0)
        task = asyncio.get_running_loop().create_task(self._drain(dep, rec, routed, timeout))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        self._notify()

    async def _drain(self, dep: DeploymentState, rec: ReplicaRecord, routed: bool,
                     timeout: float) -> None:
        if routed:
            await self._unroute()
        conn = rec.conn
        if routed and conn is not None:
            conn.ctrl({"type": "stop", "timeout_s": timeout})
        elif rec.proc is not None:
            self.backend.terminate(rec.proc)
        await self._await_exit(dep, rec, timeout + 2)

    async def _unroute(self) -> None:
        """Publish tables without the stopping replicas and give subscribers a moment to
        apply them, so that (almost) no call reaches a replica that refuses it."""
        if self._closing:
            return
        self._publish()
        version = self.version
        deadline = time.monotonic() + UNROUTE_WAIT_S
        while time.monotonic() < deadline:
            lagging = [c for c in self.subscribers
                       if c.acked is not None and c.acked < version]
            if not lagging:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                return

    async def _await_exit(self, dep: DeploymentState, rec: ReplicaRecord, timeout: float) -> None:
        if rec.proc is not None:
            await self.backend.stop_replica(rec.proc, timeout)
        dep.replicas.pop(rec.replica_id, None)
        self.metrics.forget("replica", rec.replica_id)
        self._notify()
        self.kick()

    def _replica_gone(self, dep: DeploymentState, rec: ReplicaRecord, why: str) -> None:
        if rec.state == ReplicaState.STOPPING or rec.stopping:
            return
        starting = rec.state == ReplicaState.STARTING
        rec.state = ReplicaState.DEAD
        dep.replicas.pop(rec.replica_id, None)
        if rec.proc is not None:
            self.backend.kill(rec.proc)
        code = rec.proc.exit_code() if rec.proc is not None else None
        if self._closing or self.is_going_down():
            log.info("replica %s of %s/%s stopped as the instance shuts down",
                     rec.replica_id, dep.app, dep.name)
            self.metrics.forget("replica", rec.replica_id)
            self._notify()
            return
        log.warning("replica %s of %s/%s is gone: %s (exit code %s); replacing it",
                    rec.replica_id, dep.app, dep.name, why, code)
        self._count("fleet_replica_failures_total", dep)
        self.metrics.forget("replica", rec.replica_id)
        dep.last_gone = f"replica {rec.replica_id} {why} (exit code {code})"
        dep.record_replaced(rec.replica_id, f"{why} (exit code {code})")
        self.events.add("replica_died", dep.app, dep.name, rec.replica_id,
                        f"{why} (exit code {code}); replacing it")
        if starting and dep.status != DeploymentStatus.DEPLOY_FAILED:
            dep.start_failures += 1
            if dep.start_failures >= MAX_START_FAILURES:
                self._fail(dep, f"replicas of deployment {dep.name!r} exited during start "
                                f"{dep.start_failures} times (last exit code {code}); see the "
                                "replica's output above")
        self._notify()
        self.kick()

    def _start_timed_out(self, dep: DeploymentState, rec: ReplicaRecord) -> None:
        """A replica not ready within startup_timeout_s fails the deployment as a raising
        constructor does; it is killed, whatever it is doing (a hung constructor may
        ignore SIGTERM)."""
        timeout = dep.plan.config.startup_timeout_s
        self._count("fleet_replica_failures_total", dep)
        rec.state = ReplicaState.STOPPING
        rec.message = f"not ready within startup_timeout_s={timeout:g}"
        dep.record_replaced(rec.replica_id, rec.message)
        if rec.proc is not None:
            self.backend.kill(rec.proc)
        self._fail(dep, f"replica {rec.replica_id} of deployment {dep.name!r} (application "
                        f"{dep.app!r}) was not ready within startup_timeout_s={timeout:g}: "
                        "its constructor (or the app's lifespan startup) did not return; "
                        "the replica was killed. Raise startup_timeout_s if it needs longer")
        task = asyncio.get_running_loop().create_task(self._await_exit(dep, rec, 5))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _unhealthy(self, dep: DeploymentState, rec: ReplicaRecord, why: str) -> None:
        """Stop routing to the replica, start a replacement, and stop it (its calls get
        graceful_shutdown_timeout_s to finish; then it is killed)."""
        log.warning("replica %s of %s/%s is UNHEALTHY: %s; replacing it",
                    rec.replica_id, dep.app, dep.name, why)
        self._count("fleet_health_check_failures_total", dep, rec)
        dep.last_unhealthy = (time.monotonic(), f"replica {rec.replica_id}: {why}")
        rec.state = ReplicaState.UNHEALTHY
        rec.message = why
        dep.record_replaced(rec.replica_id, f"unhealthy: {why}")
        self.events.add("replica_unhealthy", dep.app, dep.name, rec.replica_id, why)
        self._stop(dep, rec)
        self.kick()

    def _fail(self, dep: DeploymentState, message: str) -> None:
        # Logged once, in one line, and only when nobody waits for the deploy: the
        # waiter gets a DeploymentFailedError with the traceback and shows it itself.
        if dep.status != DeploymentStatus.DEPLOY_FAILED and not self._deploying.get(dep.app):
            log.warning("deployment %s/%s DEPLOY_FAILED: %s", dep.app, dep.name,
                        message.splitlines()[0] if message else "")
        if dep.status != DeploymentStatus.DEPLOY_FAILED:
            self.events.add("deployment_failed", dep.app, dep.name, "", message)
        dep.status = DeploymentStatus.DEPLOY_FAILED
        dep.message = message
        self._notify()

    # -- tables -------------------------------------------------------------------
    def tables(self) -> Tables:
        return views.tables(self.apps, self.traffic, self.version)

    def _publish(self, force: bool = False) -> None:
        tables = self.tables()
        content = (tables["deployments"], tables["routes"], tables["traffic"],
                   tables["oip"])
        if content == self._published and not force:
            return
        self._published = content
        self.version += 1
        tables["version"] = self.version
        msg: TablesMsg = {"type": "tables", "tables": tables}
        for conn in list(self.subscribers):
            conn.ctrl(msg)

    # -- the Handler protocol ---------------------------------------------------------
    def on_call(self, conn: ServerConnection, call_id: int, method: str,
                args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any) -> None:
        fn = getattr(self, "rpc_" + method, None)
        if fn is None:
            conn.reply_error(call_id, FleetError(f"the controller has no call {method!r}"))
            return

        async def run() -> None:
            try:
                conn.reply(call_id, await fn(conn, *args, **kwargs))
            except Exception as exc:
                conn.reply_error(call_id, exc)

        asyncio.get_running_loop().create_task(run())

    def on_cancel(self, conn: ServerConnection, call_id: int) -> None:
        pass

    def on_data(self, conn: ServerConnection, call_id: int, obj: Any, size: int) -> None:
        pass

    def on_ctrl(self, conn: ServerConnection, msg: ControlMessage) -> None:
        if msg["type"] == "tables_ack":
            conn.acked = int(msg["version"])
            self._notify()
        elif msg["type"] == "load":
            self._on_load(msg)
            # the caller's samples go when its connection does (a driver's loop, a proxy)
            self._load_callers.setdefault(id(conn), set()).add(
                (str(msg.get("key", "")), str(msg.get("caller", ""))))
        elif msg["type"] == "request_error":
            self._on_request_error(msg)
        elif msg["type"] == "health_result":
            self._on_health_result(msg)
        elif msg["type"] == "models":       # a multiplexed loader loaded or evicted
            found = self._find(msg.get("replica_id", ""))
            if found is not None:
                found[1].models = list(msg.get("models") or [])
                self.kick()                 # callers learn it with the next tables
        elif msg["type"] == "reconfigure_result":
            self._on_reconfigure_result(msg)
        elif msg["type"] == "metrics":
            source = str(msg.get("source", ""))
            self._metric_sources[id(conn)] = source
            try:
                self.metrics.merge(source, msg)
            except (TypeError, ValueError, KeyError):
                log.warning("metrics from %s were malformed and are ignored", source,
                            exc_info=True)

    def _on_health_result(self, msg: HealthResultMsg) -> None:
        found = self._find(msg.get("replica_id", ""))
        if found is None:
            return
        dep, rec = found
        if msg.get("id") != rec.health_id:
            return                          # the answer to an older check
        rec.health_sent = None
        rec.last_health = time.monotonic()
        rec.ongoing = int(msg.get("ongoing", 0))
        rec.batches = msg.get("batches") or {}
        if not msg["ok"] and rec.state == ReplicaState.RUNNING:
            self._unhealthy(dep, rec, msg["error"])
            self.kick()

    def _on_reconfigure_result(self, msg: ReconfigureResultMsg) -> None:
        found = self._find(msg.get("replica_id", ""))
        if found is None:
            return
        dep, rec = found
        rec.reconfiguring = False
        if not msg["ok"]:
            rec.message = msg["error"]
            self._fail(dep, f"replica {rec.replica_id} of deployment {dep.name!r} "
                            f"(application {dep.app!r}): {msg['error']}; it goes on "
                            "serving with its previous user_config. Fix reconfigure() "
                            "or the user_config and deploy again")
        self._notify()
        self.kick()

    def _on_load(self, msg: LoadMsg) -> None:
        """A caller's in-flight and queued calls to an autoscaling deployment."""
        app, _, dname = str(msg.get("key", "")).partition("#")
        dep = self.apps[app].deployments.get(dname) if app in self.apps else None
        if dep is None or dep.autoscaler is None:
            return
        load = int(msg.get("inflight", 0)) + int(msg.get("queued", 0))
        dep.autoscaler.record(str(msg.get("caller", "")), load, time.monotonic())
        if dep.target == 0 and load > 0:
            self.kick()     # a call waits on a deployment scaled to zero: start one now

    def _on_request_error(self, msg: RequestErrorMsg) -> None:
        """What a proxy told its client only by id: kept for ``fleet status``."""
        app = self.apps.get(str(msg.get("app")))
        dep = app.deployments.get(str(msg.get("deployment"))) if app is not None else None
        if dep is not None:
            dep.last_error = {"request_id": str(msg.get("request_id", ""))[:128],
                              "error": str(msg.get("error", ""))[:ERROR_TEXT_MAX],
                              "traceback": str(msg.get("traceback", ""))[-ERROR_TEXT_MAX:]}
            dep.last_error["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def _send_reconfigure(self, rec: ReplicaRecord, user_config: Any) -> None:
        if rec.conn is None:
            return                  # not connected yet: it starts with the plan's config
        rec.user_config = user_config
        rec.reconfiguring = True
        rec.conn.ctrl({"type": "reconfigure", "user_config": user_config})

    def on_closed(self, conn: ServerConnection) -> None:
        self.subscribers.discard(conn)
        source = self._metric_sources.pop(id(conn), None)
        if source is not None:
            self.metrics.drop(source)
        for key, caller in self._load_callers.pop(id(conn), ()):
            # a caller that is gone has no calls in flight: its samples would otherwise
            # count for look_back_period_s (a driver's asyncio.run loops come and go)
            app, _, dname = key.partition("#")
            dep = self.apps[app].deployments.get(dname) if app in self.apps else None
            if dep is not None and dep.autoscaler is not None:
                dep.autoscaler.samples.pop(caller, None)
        tag = conn.tag
        if isinstance(tag, tuple) and tag[0] == "replica":
            found = self._find(tag[1])
            if found is not None:
                self._replica_gone(found[0], found[1], "its connection to the controller closed")
        elif isinstance(tag, tuple) and tag[0] == "proxy":
            # only its own part: a proxy started again in its place may have reported
            # before this connection's end was seen
            if self._proxy_conns.get((tag[1], tag[2])) is conn:
                del self._proxy_conns[(tag[1], tag[2])]
                self._proxy_parts.get(tag[1], {}).pop(tag[2], None)
                self._merge_proxies(tag[1])
                self._notify()

    def _find(self, rid: str) -> tuple[DeploymentState, ReplicaRecord] | None:
        for app in self.apps.values():
            for dep in app.deployments.values():
                rec = dep.replicas.get(rid)
                if rec is not None:
                    return dep, rec
        return None

    # -- calls from replicas and proxies ---------------------------------------------
    async def rpc_subscribe(self, conn: ServerConnection) -> int:
        self.subscribers.add(conn)
        tables = self.tables()
        tables["version"] = self.version
        conn.ctrl({"type": "tables", "tables": tables})
        return self.version

    async def rpc_replica_ready(self, conn: ServerConnection, rid: str, address: str,
                                pid: int) -> None:
        found = self._find(rid)
        if found is not None and found[1].rejoin_by and found[1].conn is None \
                and found[1].state == ReplicaState.RUNNING:
            self._rejoined(found[0], found[1], conn, address, pid)
            return
        if found is None or found[1].state != ReplicaState.STARTING:
            conn.ctrl({"type": "stop", "timeout_s": 0})
            return
        dep, rec = found
        rec.conn, rec.address, rec.pid = conn, address, pid
        rec.state = ReplicaState.RUNNING
        rec.message = ""
        rec.last_health = time.monotonic()
        conn.tag = ("replica", rid)
        dep.start_failures = 0
        if rec.user_config != dep.plan.config.user_config and rec.version == dep.plan.version:
            self._send_reconfigure(rec, dep.plan.config.user_config)
        log.info("replica %s of %s/%s is RUNNING", rid, dep.app, dep.name)
        self.events.add("replica_running", dep.app, dep.name, rid, f"pid {pid}")
        self._notify()
        self.kick()

    def _rejoined(self, dep: DeploymentState, rec: ReplicaRecord, conn: ServerConnection,
                  address: str, pid: int) -> None:
        """A replica adopted after the controller restarted reconnected: routed as it
        was, health-checked again from now."""
        rec.conn, rec.address, rec.pid, rec.rejoin_by = conn, address, pid, 0.0
        rec.last_health = time.monotonic()
        conn.tag = ("replica", rec.replica_id)
        if rec.version == dep.plan.version and (
                rec.reconfiguring or rec.user_config != dep.plan.config.user_config):
            # a reconfigure the controller that died sent may not have been applied
            self._send_reconfigure(rec, dep.plan.config.user_config)
        log.info("replica %s of %s/%s rejoined", rec.replica_id, dep.app, dep.name)
        self.events.add("replica_rejoined", dep.app, dep.name, rec.replica_id, f"pid {pid}")
        self._notify()
        self.kick()

    async def rpc_replica_starting(self, conn: ServerConnection, rid: str, doing: str) -> None:
        """A starting replica says what it is doing (shown by fleet status)."""
        found = self._find(rid)
        if found is not None and found[1].state == ReplicaState.STARTING:
            found[1].message = doing

    async def rpc_replica_failed(self, conn: ServerConnection, rid: str, info: ErrorInfo) -> None:
        found = self._find(rid)
        if found is None:
            return
        dep, rec = found
        _blob, etype, message, tb, _ = info
        self._count("fleet_replica_failures_total", dep)
        rec.state = ReplicaState.STOPPING
        rec.message = f"{etype}: {message}"
        if dep.status == DeploymentStatus.DEPLOY_FAILED and dep.error_type == etype \
                and dep.message.endswith(f"raised {etype}: {message}"):
            dep.same_failures += 1
        else:
            dep.same_failures = 1
            self._fail(dep, f"the constructor of deployment {dep.name!r} (application "
                            f"{dep.app!r}) raised {etype}: {message}")
            dep.error_type, dep.traceback = etype, tb
        self._notify()
        task = asyncio.get_running_loop().create_task(self._await_exit(dep, rec, 5))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def rpc_proxy_ready(self, conn: ServerConnection, kind: str, info: dict[str, Any]
                              ) -> None:
        index = int(info.get("index", 0))
        if "error" not in info:        # one that cannot serve is not a part of status
            conn.tag = ("proxy", kind, index)
            self._proxy_conns[(kind, index)] = conn
            self._proxy_parts.setdefault(kind, {})[index] = info
            self._merge_proxies(kind)
            self._notify()
        waiter = self._proxy_waiters.pop(f"{kind}-{index}", None)
        if waiter is not None and not waiter.done():
            waiter.set_result(info)

    def _merge_proxies(self, kind: str) -> None:
        """status' view of a kind's proxies: the first one's info, and every pid."""
        parts = self._proxy_parts.get(kind)
        if not parts:
            self.proxies.pop(kind, None)
            return
        first = parts[min(parts)]
        self.proxies[kind] = dict(first, pids=[parts[i].get("pid") for i in sorted(parts)])

    def place_proxy(self, kind: str, index: int, node_id: str) -> None:
        """The cluster node the index-th proxy of kind runs on (status' proxies_by_node)."""
        self._proxy_nodes[(kind, index)] = node_id

    def expect_proxy(self, kind: str, index: int = 0, node_id: str = "") -> asyncio.Future[Any]:
        """A future for the index-th proxy of kind's report; node_id: the cluster node it
        is started on (status' proxies_by_node), when the backend has several."""
        if node_id:
            self._proxy_nodes[(kind, index)] = node_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._proxy_waiters[f"{kind}-{index}"] = fut
        return fut

    # -- calls from the driver and the CLI -------------------------------------------
    def _logging_of(self, plan: DeploymentPlan) -> dict[str, Any] | None:
        """A deployment's logging_config, else the instance's."""
        own = plan.config.logging_config
        return own.model_dump() if own is not None else self.logging_config

    def _app_sys_path(self, name: str) -> list[str]:
        """The deployer's import path first (another process may have deployed it),
        then the instance's."""
        app = self.apps.get(name)
        extra = app.sys_path if app is not None else []
        return [*extra, *(p for p in self.sys_path if p not in extra)]

    def _app_cwd(self, name: str) -> str:
        app = self.apps.get(name)
        return app.cwd if app is not None and app.cwd else self.cwd

    async def rpc_deploy(self, conn: ServerConnection | None, name: str, route_prefix: str | None,
                         plans: list[DeploymentPlan], protocol: str = "http",
                         grpc_port: int | None = None,
                         origin: dict[str, Any] | None = None) -> None:
        if route_prefix is not None:
            if not route_prefix.startswith("/"):
                raise ValueError(f"route_prefix must start with '/', got {route_prefix!r}")
            if len(route_prefix) > 1:
                route_prefix = route_prefix.rstrip("/")
            for other in self.apps.values():
                if other.name != name and other.route_prefix == route_prefix \
                        and not other.deleting:
                    raise ValueError(f"route_prefix {route_prefix!r} is already used by "
                                     f"application {other.name!r}; pick another or delete it")
        views.check_oip_names(self.apps, name, plans)
        app = self.apps.get(name)
        if app is None or app.deleting:
            app = AppState(name=name, route_prefix=route_prefix, ingress=plans[0].name)
            self.apps[name] = app
        app.route_prefix = route_prefix
        app.ingress = plans[0].name
        app.deployed_at = time.time()
        app.protocol = protocol
        app.grpc_port = grpc_port
        if origin is not None:
            app.sys_path = list(origin.get("sys_path", []))
            app.cwd = str(origin.get("cwd", ""))
        origin = dict(origin or {})
        config, note = origin.pop("config", None), str(origin.pop("note", ""))
        # the same plans, route and config as the current revision: no new revision
        same = app.revision > 0 and _deploy_key(app, plans) == app.deploy_key
        revision = self.revisions.add(name, (route_prefix, plans, protocol, grpc_port, origin),
                                      config, note, same_as_latest=same)
        app.deploy_key = _deploy_key(app, plans)
        if revision != app.revision:
            app.revision = revision
            app.deployed_at = time.time()
            self.events.add("deploy", name, "", "", f"revision {app.revision}"
                            + (f" ({note})" if note else "") + ": "
                            + ", ".join(f"{p.name} x{p.config.target_replicas()}"
                                        for p in plans))
        wanted = {p.name for p in plans}
        for dname, dep in app.deployments.items():
            if dname not in wanted:
                dep.deleting = True
        for plan in plans:
            self._apply_plan(app, plan)
        self._notify()
        self.kick()

    def _apply_plan(self, app: AppState, plan: DeploymentPlan) -> None:
        from fleet._controller.autoscaler import Autoscaler
        dep = app.deployments.get(plan.name)
        target = plan.config.target_replicas()
        if dep is None or dep.deleting and not dep.replicas:
            dep = DeploymentState(app=app.name, plan=plan, target=target)
            app.deployments[plan.name] = dep
        else:
            old = dep.plan
            dep.deleting = False
            if old.version == plan.version and old.config.user_config != plan.config.user_config:
                # Only user_config changed: the live replicas reconfigure in place.
                for rec in dep.running():
                    if rec.conn is not None:
                        self._send_reconfigure(rec, plan.config.user_config)
            if old.version != plan.version or old.config != plan.config:
                dep.last_deployed_at = time.time()
            if old.version == plan.version \
                    and old.config.logging_config != plan.config.logging_config:
                # logging changes apply in place: replicas are not restarted
                for rec in dep.running():
                    if rec.conn is not None:
                        rec.conn.ctrl({"type": "logging",
                                       "logging_config": self._logging_of(plan)})
            dep.plan = plan
            if dep.status == DeploymentStatus.DEPLOY_FAILED:
                dep.status = DeploymentStatus.UPDATING
                dep.message = ""
                dep.start_failures = 0
            if dep.autoscaler is not None and plan.config.autoscaling_config is not None:
                # Keep the load history and current count; apply the new bounds.
                dep.autoscaler.config = plan.config.autoscaling_config
                dep.target = dep.autoscaler.clamp(dep.target)
                return
            dep.target = target
        dep.autoscaler = Autoscaler(plan.config.autoscaling_config) \
            if plan.config.autoscaling_config is not None else None

    async def rpc_wait_ready(self, conn: ServerConnection, name: str) -> None:
        self._deploying[name] = self._deploying.get(name, 0) + 1
        try:
            await self._wait_ready(name)
        finally:
            self._deploying[name] -= 1
            if not self._deploying[name]:
                del self._deploying[name]

    async def _wait_ready(self, name: str) -> None:
        deploying = self.apps.get(name)
        while True:
            app = self.apps.get(name)
            # Deleted (or deleted and deployed anew) since this deploy: its deployments
            # are all marked deleting, which must not read as "every one is healthy".
            if app is None or app is not deploying or app.deleting:
                raise FleetError(f"application {name!r} was deleted while deploying")
            for dep in app.deployments.values():
                if dep.status == DeploymentStatus.DEPLOY_FAILED:
                    await self._settle(dep)
                    raise self._failure(name, dep)
            if all(d.status == DeploymentStatus.HEALTHY for d in app.deployments.values()
                   if not d.deleting):
                self._publish()
                await self._proxies_caught_up()
                if app.grpc_port is not None:
                    await self._grpc_port_open(app.grpc_port)
                return
            await self._changed.wait()

    async def _settle(self, dep: DeploymentState, timeout_s: float = 2.0) -> None:
        """Give the deployment's other starting replicas a moment to report, so the
        error says how many failed the same way instead of arriving once per replica."""
        deadline = time.monotonic() + timeout_s
        while any(r.state == ReplicaState.STARTING for r in dep.replicas.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return

    @staticmethod
    def _failure(app: str, dep: DeploymentState) -> DeploymentFailedError:
        message = f"application {app!r}: {dep.message}"
        if dep.same_failures > 1:
            message += f" ({dep.same_failures} replicas failed the same way)"
        if dep.traceback:
            message += "\n" + dep.traceback.rstrip()
        return DeploymentFailedError(message, app=app, deployment=dep.name,
                                     error_type=dep.error_type, remote_traceback=dep.traceback)

    async def _grpc_port_open(self, port: int) -> None:
        """Wait until the gRPC proxy listens on the port a driver asked for."""
        deadline = time.monotonic() + PROXY_CATCH_UP_S
        while True:
            info = self.proxies.get("grpc", {})
            if port in info.get("ports", ()):
                return
            error = info.get("port_errors", {}).get(port)
            if error is not None:
                raise FleetError(f"{error}; pick another port in DefaultgRPCDriver.bind(..., "
                                 "port=...) or free this one")
            left = deadline - time.monotonic()
            if left <= 0:
                raise FleetError(f"the gRPC proxy did not start listening on port {port} "
                                 f"within {PROXY_CATCH_UP_S:g} s; see its log")
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def _proxies_caught_up(self) -> None:
        """Wait until every connected proxy applied the current tables, so routes are
        live (a proxy that died is not waited for: its connection closed). One that is
        connected but does not catch up within PROXY_CATCH_UP_S is named in the log."""
        deadline = time.monotonic() + PROXY_CATCH_UP_S
        while True:
            lagging = [c for c in self.subscribers if isinstance(c.tag, tuple)
                       and c.tag[0] == "proxy" and (c.acked or 0) < self.version]
            if not lagging:
                return
            if time.monotonic() >= deadline:
                log.warning("proxies %s have not applied routing tables version %s after "
                            "%g s; their routes may lag", [c.tag[1:] for c in lagging],
                            self.version, PROXY_CATCH_UP_S)
                return
            try:
                await asyncio.wait_for(self._changed.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def rpc_delete(self, conn: ServerConnection, name: str) -> None:
        app = self.apps.get(name)
        if app is None:
            return
        if not app.deleting:
            self.events.add("delete", name, "", "", "application deleted")
        app.deleting = True
        for dep in app.deployments.values():
            dep.deleting = True
        self.kick()
        while name in self.apps:
            await self._changed.wait()
        self._publish()
        await self._proxies_caught_up()

    # -- the Open Inference Protocol's repository extension ----------------------------
    async def rpc_oip_index(self, conn: ServerConnection) -> list[dict[str, Any]]:
        return views.oip_index(self.apps, self._unloaded)

    async def rpc_oip_unload(self, conn: ServerConnection, model: str) -> None:
        """Unload a model: delete the application serving it, remembering how to load it."""
        entry = views.oip_models(self.apps).get(model)
        if entry is None:
            raise KeyError(f"no model {model!r} is loaded; loaded: "
                           f"{sorted(views.oip_models(self.apps)) or 'none'}")
        app = self.apps[entry["app"]]
        plans = sorted((d.plan for d in app.deployments.values() if not d.deleting),
                       key=lambda p: p.name != app.ingress)
        self._unloaded[model] = (app.name, app.route_prefix, plans, app.protocol)
        await self.rpc_delete(conn, app.name)

    async def rpc_oip_load(self, conn: ServerConnection, model: str) -> None:
        """Load a model unloaded before: deploy its application again, until ready."""
        if model in views.oip_models(self.apps):
            self._unloaded.pop(model, None)
            return
        saved = self._unloaded.get(model)
        if saved is None:
            raise KeyError(f"no model {model!r} to load: only models unloaded through "
                           f"/v2/repository can be loaded again; deploy others with fleet.run")
        await self.rpc_deploy(conn, *saved)
        self._unloaded.pop(model, None)
        await self.rpc_wait_ready(conn, saved[0])

    async def rpc_status(self, conn: ServerConnection) -> dict[str, Any]:
        return self.status()

    # -- operators' changes (the management API) ----------------------------------------
    def find_deployment(self, app_name: str, dep_name: str) -> DeploymentState:
        """A live deployment, or KeyError saying what exists."""
        app = self.apps.get(app_name)
        if app is None or app.deleting:
            raise KeyError(f"no application named {app_name!r}; running: "
                           f"{sorted(a for a in self.apps if not self.apps[a].deleting)}")
        dep = app.deployments.get(dep_name)
        if dep is None or dep.deleting:
            names = sorted(d for d, s in app.deployments.items() if not s.deleting)
            raise KeyError(f"application {app_name!r} has no deployment {dep_name!r}; it has "
                           f"{names}")
        return dep

    async def rpc_scale(self, conn: ServerConnection | None, app_name: str, dep_name: str,
                        num_replicas: int) -> None:
        """Set a fixed-size deployment's replica count until its next deploy."""
        dep = self.find_deployment(app_name, dep_name)
        if dep.autoscaler is not None:
            raise ValueError(f"deployment {dep_name!r} of application {app_name!r} "
                             "autoscales; change its autoscaling_config (min_replicas, "
                             "max_replicas) with a deploy instead of scaling it")
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) \
                or num_replicas < 0:
            raise ValueError(f"num_replicas must be a whole number >= 0, got {num_replicas!r}")
        self.events.add("scale", app_name, dep_name, "",
                        f"num_replicas {dep.target} -> {num_replicas}")
        dep.target = num_replicas
        self._notify()
        self.kick()

    async def rpc_restart_replica(self, conn: ServerConnection | None, app_name: str,
                                  dep_name: str, replica_id: str) -> None:
        """Drain one replica; the reconcile loop starts its replacement."""
        dep = self.find_deployment(app_name, dep_name)
        rec = dep.replicas.get(replica_id)
        if rec is None or not rec.live:
            raise KeyError(f"deployment {dep_name!r} of application {app_name!r} has no "
                           f"live replica {replica_id!r}; its replicas are "
                           f"{sorted(r.replica_id for r in dep.live())}")
        dep.record_replaced(replica_id, "restarted on request")
        self.events.add("replica_restart", app_name, dep_name, replica_id,
                        "restarted on request")
        self._stop(dep, rec)
        self.kick()

    async def rpc_rollback(self, conn: ServerConnection | None, app_name: str,
                           to: int | None = None) -> int:
        """Deploy an earlier revision again (default: the one before the current);
        returns the new revision's number."""
        revisions = self.revisions.list(app_name)
        if not revisions:
            raise KeyError(f"application {app_name!r} has no revisions")
        current = self.revisions.latest(app_name)
        if to is None:
            earlier = [r for r in revisions if r["revision"] < current]
            if not earlier:
                raise ValueError(f"application {app_name!r} has no revision before "
                                 f"revision {current} to roll back to")
            to = earlier[-1]["revision"]
        rev = self.revisions.get(app_name, to)
        if rev is None:
            raise KeyError(f"application {app_name!r} has no revision {to}; kept: "
                           f"{[r['revision'] for r in revisions]}")
        route_prefix, plans, protocol, grpc_port, origin = rev["deploy_args"]
        await self.rpc_deploy(conn, app_name, route_prefix, plans, protocol, grpc_port,
                              {**origin, "config": rev["config"],
                               "note": f"rollback to revision {to}"})
        return self.apps[app_name].revision

    async def rpc_shutdown_instance(self, conn: ServerConnection) -> None:
        """Another process asked the instance to stop (``fleet.shutdown()`` there): its
        owner does it, off this loop, since stopping ends the loop."""
        if self.on_shutdown_request is None:
            raise FleetError("this instance cannot be stopped from another process")
        self.on_shutdown_request()

    async def rpc_report_load(self, conn: ServerConnection, key: str, caller: str,
                              inflight: int, queued: int) -> None:
        self._on_load({"type": "load", "key": key, "caller": caller, "inflight": inflight,
                       "queued": queued})

    def status(self) -> dict[str, Any]:
        nodes = self.backend.nodes()
        node_id = str(nodes[0].get("node_id", "local")) if nodes else "local"
        out = views.status(self.apps, self.proxies, self.traffic, node_id,
                           self.window_stats)
        if self._proxy_nodes:
            out["proxies_by_node"] = views.proxies_by_node(self._proxy_parts, self._proxy_nodes)
        return out

    def window_stats(self, app: str, deployment: str | None, window: float = 60.0
                     ) -> dict[str, Any]:
        """The last window's requests/s, p50/p90/p99 (seconds) and error rate of a
        deployment (or an application's ingress), from its replicas' metrics."""
        return summary(self.metrics, app, deployment, window)

    # -- metrics ------------------------------------------------------------------------
    def top(self, window: float = 60.0) -> list[dict[str, Any]]:
        """One row per deployment over the last window: requests/s, p50/p90/p99
        (seconds), error rate, ongoing and queued calls, replicas running and target."""
        gauges = self.metrics.gauge_values()
        rows = []
        for app in self.apps.values():
            for dep in app.deployments.values():
                ongoing = queued = 0.0
                for (name, labels), v in gauges.items():
                    if name not in ("fleet_ongoing_requests", "fleet_queued_requests"):
                        continue
                    have = dict(labels)
                    if have.get("application") == app.name \
                            and have.get("deployment") == dep.name:
                        if name == "fleet_ongoing_requests":
                            ongoing += v
                        else:
                            queued += v
                row: dict[str, Any] = {"application": app.name, "deployment": dep.name,
                                       "status": dep.status.value}
                row.update(self.window_stats(app.name, dep.name, window))
                row.update({"ongoing": int(ongoing), "queued": int(queued),
                            "running_replicas": len(dep.running()),
                            "target_replicas": dep.target})
                rows.append(row)
        return rows

    async def rpc_logs_dir(self, conn: ServerConnection) -> str:
        return self.logs_dir

    async def rpc_top(self, conn: ServerConnection, window: float = 60.0
                      ) -> list[dict[str, Any]]:
        return self.top(window)

    async def rpc_metrics_text(self, conn: ServerConnection) -> str:
        return self.metrics.prometheus()

    async def rpc_metrics_series(self, conn: ServerConnection, name: str,
                                 match: dict[str, str], window: float = 900.0,
                                 rate: bool = False, quantile: float | None = None
                                 ) -> dict[str, Any]:
        return self.metrics.series(name, match, window, rate, quantile)

    # -- traffic policies ------------------------------------------------------------
    async def rpc_set_traffic(self, conn: ServerConnection, route_prefix: str,
                              weights: dict[str, float] | None) -> None:
        await self._traffic_changed(traffic.set_weights(self.traffic, self.apps, route_prefix,
                                                        weights))

    async def rpc_shadow_traffic(self, conn: ServerConnection, route_prefix: str, app: str,
                                 fraction: float) -> None:
        await self._traffic_changed(traffic.set_shadow(self.traffic, self.apps, route_prefix,
                                                       app, fraction))

    async def _traffic_changed(self, prefix: str) -> None:
        log.info("traffic policy of route %s: %s", prefix, self.traffic.get(prefix, "none"))
        self._publish()
        await self._proxies_caught_up()

    async def shutdown(self) -> None:
        self._closing = True
        for app in self.apps.values():
            app.deleting = True
            for dep in app.deployments.values():
                dep.deleting = True
                for rec in dep.live():
                    self._stop(dep, rec)
        if self._stopping:
            await asyncio.wait(list(self._stopping), timeout=30)
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        """Shut down (see :meth:`shutdown`) and wait until the controller's loop ended."""
        await self.shutdown()
        task, self._task = self._task, None
        if task is not None:
            try:
                await task
            except asyncio.CancelledError:
                pass


def _deploy_key(app: AppState, plans: list[DeploymentPlan]) -> Any:
    """What makes two deploys of an application the same revision."""
    return (app.route_prefix, app.protocol, app.grpc_port,
            [(p.name, p.version, repr(p.config.model_dump())) for p in plans])
