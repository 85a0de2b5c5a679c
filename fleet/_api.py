"""The driver-side API: start an instance, run applications, inspect and stop them."""

from __future__ import annotations

import asyncio
import atexit
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import cloudpickle

from fleet import _rundir
from fleet._backends.local import LocalBackend
from fleet._config import GRPCOptions, HTTPOptions, coerce_options
from fleet._controller.controller import Controller
from fleet._deployment import Application, build_plans
from fleet._handle import DeploymentHandle
from fleet._runtime import Runtime, set_current
from fleet._wire.listener import listen
from fleet.exceptions import FleetError

T = TypeVar("T")

PROXY_START_TIMEOUT_S = 30.0


def instance_file() -> str:
    """Where this process's instance records its address, for ``fleet status`` and
    friends (one file per instance, in fleet's private runtime directory)."""
    return _rundir.instance_path()


class Instance:
    """One fleet instance owned by this process: controller, backend and proxies,
    all on a background event loop thread."""

    def __init__(self, http_options: HTTPOptions, grpc_options: GRPCOptions) -> None:
        self.http_options = http_options
        self.grpc_options = grpc_options
        # sockets live in a private directory of their own inside the runtime directory
        self.dir = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=_rundir.runtime_dir())
        self.secret = secrets.token_bytes(32)
        self.address = f"unix:{self.dir}/controller.sock"
        try:
            import uvloop
            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet-controller",
                                       daemon=True)
        self.backend = LocalBackend()
        self.controller: Controller | None = None
        self.runtime: Runtime | None = None
        self._server: asyncio.AbstractServer | None = None
        self.closed = False

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run coro on the instance's loop and wait for it from this thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        try:
            self.call(self._start())
        except BaseException:
            self.shutdown()
            raise

    async def _start(self) -> None:
        self.controller = Controller(self.backend, self.secret, self.address,
                                     sys_path=list(sys.path), cwd=os.getcwd())
        self._server = await listen(self.controller, self.secret, self.address)
        self.controller.start()
        self.runtime = Runtime(self.loop, self.address, self.secret)
        await self.runtime.connect_controller(subscribe=True)
        set_current(self.runtime)
        waits = []
        if self.http_options.enabled:
            waits.append(self._start_proxy("http", self.http_options))
        if self.grpc_options.enabled:
            waits.append(self._start_proxy("grpc", self.grpc_options))
        for info in await asyncio.gather(*waits):
            if "error" in info:
                raise FleetError(info["error"])
        self._write_instance_file()

    async def _start_proxy(self, kind: str, options: Any) -> dict[str, Any]:
        assert self.controller is not None
        waiter = self.controller.expect_proxy(kind)
        boot = {"kind": kind, "controller_address": self.address, "secret": self.secret,
                "options": cloudpickle.dumps(options), "sys_path": list(sys.path)}
        proc = self.backend.spawn(f"proxy-{kind}", "fleet._proxy", boot)
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(waiter), 0.1)
            except asyncio.TimeoutError:
                if not proc.alive():
                    return {"error": f"the {kind} proxy process exited with code "
                                     f"{proc.exit_code()} before serving; see its output above"}

    def _write_instance_file(self) -> None:
        _rundir.live_instances()        # removes the files of instances that are gone
        _rundir.write_instance({"address": self.address, "secret": self.secret.hex(),
                                "pid": os.getpid(), "started": time.time()})

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.thread.is_alive():
            try:
                self.call(self._shutdown(), timeout=60)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.backend.kill_all()
        set_current(None)
        _rundir.remove_instance()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _shutdown(self) -> None:
        if self.runtime is not None:
            self.runtime.close("fleet was shut down before this call reached a replica")
        if self.controller is not None:
            await self.controller.shutdown()
            task = self.controller._task
            if task is not None:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self.runtime is not None and self.runtime.controller is not None:
            self.runtime.controller.close()
        if self._server is not None:
            self._server.close()
        for conn in list(self.controller.subscribers if self.controller else []):
            conn.close()
        await self.backend.shutdown()


_instance: Instance | None = None
_lock = threading.RLock()


def _current_instance() -> Instance:
    with _lock:
        if _instance is None or _instance.closed:
            start()
        assert _instance is not None
        return _instance


def start(http_options: dict[str, Any] | HTTPOptions | None = None,
          grpc_options: dict[str, Any] | GRPCOptions | None = None) -> None:
    """Start fleet's instance in this process: the controller, the local backend and the
    HTTP proxy (``http_options``: host, port, middlewares, request_timeout_s, root_path,
    max_body_bytes, access_log) and, when ``grpc_options`` is given, the gRPC proxy.

    Calling it again while an instance runs does nothing. ``fleet.run`` calls it with
    defaults (HTTP on 127.0.0.1:8000) when needed.
    """
    global _instance
    http = coerce_options(HTTPOptions, http_options, "http_options")
    grpc_given = grpc_options is not None
    grpc = coerce_options(GRPCOptions, grpc_options, "grpc_options")
    if grpc_given and (not isinstance(grpc_options, dict) or "enabled" not in grpc_options):
        grpc.enabled = True
    with _lock:
        if _instance is not None and not _instance.closed:
            return
        inst = Instance(http, grpc)
        inst.start()
        _instance = inst


def shutdown() -> None:
    """Stop every application and replica and the proxies; nothing is left running."""
    global _instance
    with _lock:
        inst, _instance = _instance, None
    if inst is not None:
        inst.shutdown()


atexit.register(shutdown)


def _ctl(method: str, *args: Any) -> Any:
    inst = _current_instance()
    assert inst.runtime is not None
    return inst.call(inst.runtime.call_controller(method, *args))


def run(app: Application, name: str = "default", route_prefix: str | None = "/",
        blocking: bool = False) -> DeploymentHandle:
    """Deploy app under name and wait until every replica is ready; returns the ingress
    deployment's handle. Running an app under an existing name updates it in place:
    deployments whose code and options did not change keep their replicas.

    Raises :class:`fleet.DeploymentFailedError` (with the replica's traceback) when a
    constructor fails.
    """
    if not isinstance(app, Application):
        raise TypeError(f"fleet.run expects an Application (Deployment.bind(...)), got "
                        f"{type(app).__name__}")
    from fleet.dag import prepare_app  # graph drivers turn into plain applications
    app, protocol = prepare_app(app)
    plans = build_plans(app, name)
    # Before deploying: the route is live before run() returns, and a SIGTERM from then
    # on must shut down cleanly, start-up included.
    stop = _stop_on_sigterm() if blocking else None
    try:
        _ctl("deploy", name, route_prefix, plans, protocol)
        _ctl("wait_ready", name)
    except KeyboardInterrupt:
        if stop is not None:        # Ctrl-C or SIGTERM while starting: stop everything
            stop.serving()          # (a second signal must not interrupt the shutdown)
            shutdown()
        raise
    handle = DeploymentHandle(plans[0].name, name)
    if plans[0].legacy_refs:
        handle = handle._with_legacy_refs()
    if stop is not None:
        stop.serving()
        _block(stop.event)
    return handle


class StopSignals:
    """A handler for SIGTERM and SIGINT: while starting, interrupts the start (as
    KeyboardInterrupt, which also ends a wait on the instance); once serving, sets
    ``event`` for the main loop to stop."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._serving = False

    def serving(self) -> None:
        self._serving = True

    def __call__(self, signum: int, _frame: Any) -> None:
        self.event.set()
        if not self._serving:
            raise KeyboardInterrupt(f"signal {signum} while starting")


def _stop_on_sigterm() -> StopSignals:
    import signal
    stop = StopSignals()
    signal.signal(signal.SIGTERM, stop)
    return stop


def _block(stop: threading.Event) -> None:
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    shutdown()


def delete(name: str) -> None:
    """Delete an application: its replicas stop and its route goes away."""
    _ctl("delete", name)


def status() -> dict[str, Any]:
    """The instance's state: ``{"applications": {app: {"status", "route_prefix",
    "deployments": {name: {"status", "message", "replicas": [{"replica_id", "state",
    "pid", "message"}]}}}}, "proxies": {...}}``. A deployment whose requests failed also
    has ``"last_error"``: the latest one's ``request_id``, ``error``, ``traceback``, ``at``."""
    return dict(_ctl("status"))


def get_app_handle(name: str) -> DeploymentHandle:
    """The handle of a running application's ingress deployment."""
    apps = status()["applications"]
    if name not in apps:
        raise FleetError(f"no application named {name!r}; running: {sorted(apps) or 'none'}")
    return DeploymentHandle(apps[name]["ingress"], name)


def get_deployment_handle(deployment_name: str, app_name: str = "default") -> DeploymentHandle:
    """The handle of one deployment of a running application."""
    apps = status()["applications"]
    if app_name not in apps:
        raise FleetError(f"no application named {app_name!r}; running: "
                         f"{sorted(apps) or 'none'}")
    if deployment_name not in apps[app_name]["deployments"]:
        raise FleetError(f"application {app_name!r} has no deployment {deployment_name!r}; it "
                         f"has {sorted(apps[app_name]['deployments'])}")
    return DeploymentHandle(deployment_name, app_name)


def set_traffic(route_prefix: str, weights: dict[str, float] | None) -> None:
    """Split the requests of ``route_prefix`` across applications by weight, e.g.
    ``fleet.set_traffic("/", {"app_v1": 0.9, "app_v2": 0.1})``. Weights are relative,
    non-negative and not all zero, and every application must be running. Takes effect
    on the proxies before it returns; requests in flight are not disturbed. ``None`` or
    ``{}`` sends the route's traffic to its own application again.
    """
    _ctl("set_traffic", route_prefix, weights)


def shadow_traffic(route_prefix: str, app_name: str, fraction: float) -> None:
    """Copy ``fraction`` (0 to 1) of the requests of ``route_prefix`` to the application
    ``app_name`` and drop its answers: the client only ever sees the primary's response,
    and a failing shadow never affects it. ``fraction=0`` stops shadowing to that app.
    """
    _ctl("shadow_traffic", route_prefix, app_name, fraction)


def _apply_traffic(entries: list[Any]) -> None:
    """Apply the ``traffic`` entries of a YAML config (:class:`fleet._config.TrafficConfig`)."""
    for entry in entries:
        set_traffic(entry.route_prefix, entry.weights or None)
        for app_name, fraction in entry.shadow.items():
            shadow_traffic(entry.route_prefix, app_name, fraction)
