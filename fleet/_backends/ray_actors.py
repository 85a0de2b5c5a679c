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
from typing import Any

import ray

from fleet._types import ReplicaSpec

log = logging.getLogger("fleet.ray")


def _node() -> tuple[str, str]:
    """This worker's Ray node id (hex) and the node's address."""
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


@ray.remote
class ReplicaActor:
    """One replica: its own event loop thread, serving until told to stop."""

    def __init__(self, spec: ReplicaSpec, chdir: bool) -> None:
        self.node_id, host = _node()
        spec.listen_host = host
        self._replica: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._code = 1
        self._started = threading.Event()
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(spec, chdir), name="fleet-replica",
                         daemon=True).start()

    def _run(self, spec: ReplicaSpec, chdir: bool) -> None:
        from fleet._replica.process import serve

        def started(replica: Any, loop: asyncio.AbstractEventLoop) -> None:
            self._replica, self._loop = replica, loop
            self._started.set()
        try:
            self._code = serve(spec, started, chdir=chdir)
        except BaseException:  # noqa: BLE001 - the exit code says it; the log says why
            log.exception("replica %s failed", spec.replica_id)
            self._code = 1
        finally:
            self._started.set()
            self._done.set()

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

    def wait(self) -> int:
        """Block until the replica ended; its exit code."""
        self._done.wait()
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
            return await _serve(kind, boot, loop, stop)
        try:
            self._code = loop.run_until_complete(main())
        except BaseException:  # noqa: BLE001 - the exit code says it; the log says why
            log.exception("the %s proxy failed", kind)
        finally:
            self._done.set()

    def ready(self) -> tuple[str, int]:
        return self.node_id, os.getpid()

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass

    def wait(self) -> int:
        self._done.wait()
        return self._code
