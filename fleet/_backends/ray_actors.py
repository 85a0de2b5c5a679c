"""What runs inside Ray's worker processes: one replica or one proxy per actor.

Each actor runs the same code as the local backend's processes (``_replica.process.serve``
and ``_proxy.process._serve``) on an event loop of its own thread, and talks fleet's data
plane: TCP on its node's address, authenticated with the instance's secret, which
arrives as a constructor argument (never in argv or the environment). The actors are
threaded (``max_concurrency``) so that ``wait`` can block for the replica's whole life
while ``ready`` and ``stop`` still answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from fleet._types import ReplicaSpec

log = logging.getLogger("fleet.ray")

# The detached controller's actor (ControllerActor, below) and its namespace.
CONTROLLER_NAME = "fleet-controller"
NAMESPACE = "fleet"


def _controller_address() -> str:
    """The detached controller's data-plane address (a blocking Ray call)."""
    try:
        actor = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        return str(ray.get(actor.address.remote(), timeout=5))
    except Exception as exc:  # noqa: BLE001 - not there yet, restarting, or gone
        raise ConnectionError(f"no fleet controller answers on this cluster yet "
                              f"({type(exc).__name__})") from None


# The detached controller's checkpoint, in the GCS key-value store (one per cluster).
STATE_KEY = "controller-state"


def save_state(blob: bytes) -> None:
    """Write the detached controller's checkpoint."""
    from ray.experimental import internal_kv
    internal_kv._internal_kv_put(STATE_KEY, blob, overwrite=True, namespace=NAMESPACE)


def load_state() -> dict[str, Any] | None:
    """The checkpoint a detached controller that died left, or None."""
    import cloudpickle
    from ray.experimental import internal_kv
    blob = internal_kv._internal_kv_get(STATE_KEY, namespace=NAMESPACE)
    return None if not blob else dict(cloudpickle.loads(blob))


def drop_state() -> None:
    from ray.experimental import internal_kv
    internal_kv._internal_kv_del(STATE_KEY, namespace=NAMESPACE)


# A detached controller that could not recover exits after this long, and Ray starts it
# again; one that could not start waits up to TELL_S for info() to say why, then ends.
RECOVER_RETRY_S = 1.0
TELL_S = 30.0
# How long one that could not start lives on after info() said why: info's answer must
# leave the actor before it kills itself (the caller that got it removes it at once).
TOLD_GRACE_S = 5.0
# How long a detached actor whose work ended waits for its controller to take its exit
# code (wait()) before it ends itself.
END_GRACE_S = 1.0


def _end_detached() -> None:
    """A detached actor (under a detached controller) whose replica or proxy ended: it
    ends itself, since nothing else will when its controller is gone for good."""
    time.sleep(END_GRACE_S)
    try:
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
    except Exception:  # noqa: BLE001 - Ray is going away already
        pass


async def find_controller() -> str:
    """Where the detached controller listens now (it moves when it restarts)."""
    return await asyncio.get_running_loop().run_in_executor(None, _controller_address)


def _node() -> tuple[str, str]:
    """This worker's Ray node id (hex) and the node's address."""
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


@ray.remote
class ReplicaActor:
    """One replica: its own event loop thread, serving until told to stop."""

    def __init__(self, spec: ReplicaSpec, chdir: bool, rejoin: bool = False) -> None:
        self.node_id, host = _node()
        spec.listen_host = host
        self._replica: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._code = 1
        self._started = threading.Event()
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(spec, chdir, rejoin), name="fleet-replica",
                         daemon=True).start()

    def _run(self, spec: ReplicaSpec, chdir: bool, rejoin: bool) -> None:
        from fleet._replica.process import serve

        def started(replica: Any, loop: asyncio.AbstractEventLoop) -> None:
            self._replica, self._loop = replica, loop
            if rejoin:      # under a detached controller: wait for it when it restarts
                replica.runtime.find_controller = find_controller
            self._started.set()
        try:
            self._code = serve(spec, started, chdir=chdir)
        except BaseException:  # noqa: BLE001 - the exit code says it; the log says why
            log.exception("replica %s failed", spec.replica_id)
            self._code = 1
        finally:
            self._started.set()
            self._done.set()
        if rejoin:
            _end_detached()

    def ready(self) -> tuple[str, int]:
        """Where it runs: (Ray node id hex, process id)."""
        return self.node_id, os.getpid()

    def stop(self) -> None:
        """Drain and stop, as SIGTERM does to a replica process."""
        self._started.wait(60)
        if self._loop is not None and self._replica is not None:
            try:
                self._loop.call_soon_threadsafe(self._replica.request_stop)
            except RuntimeError:
                pass        # the loop already closed: the replica ended

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until the replica ended (its exit code), or for timeout_s (None): a
        caller that dies waiting (a controller) holds one of its threads that long."""
        if not self._done.wait(timeout_s):
            return None
        return self._code


def _listening_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other proxies on this host share (SO_REUSEPORT): every
    node of a cluster gets a proxy on the same port, several nodes may share a host."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


@ray.remote
class InstanceDirectory:
    """Where the fleet instance of this cluster answers: its management API's address
    and token, the owner's pid and node. Owned by the instance's driver."""

    def __init__(self, info: dict[str, Any]) -> None:
        self._info = dict(info)

    def info(self) -> dict[str, Any]:
        return self._info


@ray.remote
class ProxyActor:
    """One HTTP or gRPC proxy on its node."""

    def __init__(self, boot: dict[str, Any]) -> None:
        self.node_id, _host = _node()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._code = 1
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(boot,), name="fleet-proxy",
                         daemon=True).start()

    def _run(self, boot: dict[str, Any]) -> None:
        import cloudpickle

        from fleet._proxy.process import _serve
        from fleet._proxy.startup import proxy_failed
        from fleet._runtime import Runtime
        try:
            import uvloop
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        stop = asyncio.Event()
        self._stop = stop
        kind = boot["kind"]
        error = ""
        sock = None
        if kind == "http":
            options = cloudpickle.loads(boot["options"])
            try:
                sock = _listening_socket(options.host, options.port)
                boot = dict(boot, listen_fd=sock.fileno())
            except OSError as exc:
                error = f"the HTTP proxy cannot listen on {options.host}:{options.port}: {exc}"
        else:
            boot = dict(boot, shared=True)

        async def main() -> int:
            if error:
                runtime = Runtime(loop, boot["controller_address"], boot["secret"])
                await runtime.connect_controller()
                return await proxy_failed(runtime, kind, error, boot.get("index", 0))
            return await _serve(kind, boot, loop, stop, setup)

        def setup(runtime: Runtime) -> None:
            if boot.get("rejoin"):      # under a detached controller
                runtime.find_controller = find_controller

        try:
            self._code = loop.run_until_complete(main())
        except BaseException:  # noqa: BLE001 - the exit code says it; the log says why
            log.exception("the %s proxy failed", kind)
        finally:
            self._done.set()
        if boot.get("rejoin"):
            _end_detached()

    def ready(self) -> tuple[str, int]:
        return self.node_id, os.getpid()

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass

    def wait(self, timeout_s: float | None = None) -> int | None:
        if not self._done.wait(timeout_s):
            return None
        return self._code


@ray.remote
class ControllerActor:
    """A fleet instance whose controller is a detached actor (named CONTROLLER_NAME in
    NAMESPACE): it outlives the process that made it, and Ray starts it again when it
    dies; it then recovers from its checkpoint and adopts the replicas and proxies that
    still run. build(settings, secret, instance_id) makes the (unstarted) instance; it
    comes by reference, so this module needs nothing above the backends."""

    def __init__(self, build: Callable[[dict[str, Any], bytes, str], Any],
                 settings: dict[str, Any], secret: bytes, instance_id: str) -> None:
        self._inst: Any = None
        self._error = ""
        self._listening = threading.Event()
        self._ready = threading.Event()
        self._told = threading.Event()      # info() said why it could not start
        threading.Thread(target=self._run, args=(build, settings, secret, instance_id),
                         name="fleet-controller-actor", daemon=True).start()
        # address() answers from here on: replicas and proxies reconnecting need it
        # before the instance is fully up (it waits for them)
        self._listening.wait(120)

    def _run(self, build: Callable[[dict[str, Any], bytes, str], Any],
             settings: dict[str, Any], secret: bytes, instance_id: str) -> None:
        recovering = False
        try:
            inst = build(settings, secret, instance_id)
            recovering = inst.recover is not None
            inst.listening = self._listening
            self._inst = inst
            inst.start()
        except BaseException as exc:  # noqa: BLE001 - info() says it to whoever started it
            from fleet.exceptions import FleetError
            doing = "recover" if recovering else "start"
            if isinstance(exc, FleetError):     # a one-line reason (a port in use, say)
                log.warning("the fleet controller could not %s: %s", doing, exc)
                self._error = str(exc)
            else:
                log.exception("the fleet controller failed to %s", doing)
                self._error = f"{type(exc).__name__}: {exc}"
        finally:
            self._listening.set()
            self._ready.set()
        if self._error and recovering:
            # What runs stays (replicas and proxies serve on and look for a controller):
            # Ray starts this actor again, which tries again from the same checkpoint.
            time.sleep(RECOVER_RETRY_S)
            os._exit(1)
        if not self._error:
            self._inst.stopped.wait()
        else:
            # whoever started it hears why before it goes, and has its answer
            if self._told.wait(TELL_S):
                time.sleep(TOLD_GRACE_S)
        # shut down (fleet shutdown, fleet.shutdown()), or unable to start: the instance's
        # state goes, and so does this actor, for good
        try:
            drop_state()
        finally:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def address(self) -> str:
        """Where the controller listens (its data-plane address)."""
        self._listening.wait(120)
        if self._inst is None or self._error:
            raise ConnectionError(self._error or "the fleet controller is not up")
        return str(self._inst.address)

    def info(self) -> dict[str, Any]:
        """What a process needs to use the instance (AttachedInstance), once it is up; or
        {"error": why it could not start}."""
        self._ready.wait(300)
        if self._error or self._inst is None:
            self._told.set()
            return {"error": self._error or "the fleet controller did not start in 300 s"}
        info = dict(self._inst.record(), detached=True, node=self._inst.backend.listen_host)
        http = self._inst.controller.proxies.get("http") if self._inst.controller else None
        if http:
            info["http"] = f"{http.get('scheme', 'http')}://{http['host']}:{http['port']}"
        return info
