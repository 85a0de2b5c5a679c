"""The driver-side API: start an instance, run applications, inspect and stop them."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import cloudpickle

from fleet import _logs, _rundir
from fleet._backends.local import LocalBackend
from fleet._config import (
    GRPCOptions,
    HTTPOptions,
    LoggingConfig,
    ManagementOptions,
    coerce_options,
    proxy_count,
)
from fleet._controller.controller import Controller
from fleet._deployment import Application, build_plans
from fleet._handle import DeploymentHandle
from fleet._runtime import Runtime, bind, set_starter, unbind
from fleet._types import Adopting, Backend
from fleet._wire.listener import bound_port, listen
from fleet.exceptions import FleetError

T = TypeVar("T")

PROXY_START_TIMEOUT_S = 30.0
# How often an instance on a cluster looks for nodes that joined (EveryNode proxies).
NODE_WATCH_S = 1.0
# How often the instance checks that the proxies it started still run.
PROXY_WATCH_S = 0.1
# A proxy that died is started again after a delay that doubles with each failure in a
# row, from the first to the last; a proxy that served this long counts as well again.
PROXY_RESTART_FIRST_S = 0.1
PROXY_RESTART_MAX_S = 5.0
PROXY_STABLE_S = 30.0

log = logging.getLogger("fleet.proxies")


def restart_delay(failures: int, first_s: float = PROXY_RESTART_FIRST_S,
                  max_s: float = PROXY_RESTART_MAX_S) -> float:
    """How long to wait before starting a proxy again after failures deaths or failed
    starts in a row (0 for the first): first_s doubling up to max_s."""
    return min(max_s, first_s * 2.0 ** min(max(failures, 0), 32))


@dataclass
class ProxySlot:
    """A proxy the instance started and keeps running: how to start it again on the same
    port (and node), the process that runs it now and how it has fared."""

    kind: str
    index: int
    options: Any                  # with the port it listens on (never 0 once serving)
    listen_fd: int | None         # the listening socket it shares (several HTTP proxies)
    shared: bool                  # SO_REUSEPORT with its siblings (gRPC, num_proxies > 1)
    node_id: str
    proc: Any
    pid: int | None
    serving_since: float          # loop time it reported serving
    failures: int = 0             # deaths and failed starts in a row
    restarting: bool = False

    @property
    def name(self) -> str:
        label = "HTTP" if self.kind == "http" else "gRPC"
        where = f" on node {self.node_id}" if self.node_id else ""
        return f"{label} proxy {self.index}{where}"


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as read (asyncio logs an exception nobody read)."""
    if not fut.cancelled():
        fut.exception()


def _pickle_and_save(save: Callable[[bytes], None], state: dict[str, Any]) -> None:
    save(cloudpickle.dumps(state))


def _proxy_key(kind: str, index: int) -> str:
    """The backend's key of a proxy (a Ray actor's name ends with it)."""
    return f"proxy-{kind}" if index == 0 else f"proxy-{kind}-{index}"


def _proxies_on(options: Any, node: dict[str, Any]) -> int:
    """How many proxies of options' kind a cluster node runs: num_proxies ("auto": one
    per CPU the node has)."""
    if options.num_proxies == "auto":
        return max(1, int(node.get("cpus") or 1))
    return max(1, int(options.num_proxies))


def instance_file() -> str:
    """Where this process's instance records its address, for ``fleet status`` and
    friends (one file per instance, in fleet's private runtime directory)."""
    return _rundir.instance_path()


# A Unix socket's path must fit in 108 bytes (sun_path). The longest fleet makes is the
# directory plus "/controller.sock" or "/r-<8 hex>.sock".
_MAX_SOCKET_DIR = 90


def _socket_dir() -> str:
    """A new private (0700) directory for an instance's sockets: in the runtime directory,
    or, when that path is too long for a socket (a deep TMPDIR), in /tmp."""
    path = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=_rundir.runtime_dir())
    if len(path.encode()) <= _MAX_SOCKET_DIR:
        return path
    os.rmdir(path)
    return tempfile.mkdtemp(prefix=f"fleet-{os.getuid()}-{os.getpid()}-", dir="/tmp")


class Instance:
    """One fleet instance owned by this process: controller, backend and proxies,
    all on a background event loop thread."""

    def __init__(self, http_options: HTTPOptions, grpc_options: GRPCOptions,
                 backend: Backend | None = None, register: bool = True,
                 management: ManagementOptions | None = None,
                 management_fallback: bool = False,
                 logging_config: LoggingConfig | None = None,
                 proxy_location: str = "EveryNode", ray_address: str | None = None) -> None:
        self.logging_config = logging_config or LoggingConfig()
        if not self.logging_config.enable_access_log:
            # one switch for the proxies' access log: http_options.access_log is an alias
            http_options = http_options.model_copy(update={"access_log": False})
        self.http_options = http_options
        self.grpc_options = grpc_options
        self.proxy_location = proxy_location
        self.ray_address = ray_address
        # the management server runs when asked (fleet run, fleet start, management_options)
        self.management = management
        self.management_fallback = management_fallback   # a free port if its port is taken
        self.ops: Any = None
        self._mgmt_server: Any = None
        self.extra_info: dict[str, Any] = {}     # more for the instance file (fleet start)
        # sockets live in a private directory of their own inside the runtime directory
        self.dir = _socket_dir()
        self.secret = secrets.token_bytes(32)
        self.address = f"unix:{self.dir}/controller.sock"
        try:
            import uvloop
            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet-controller",
                                       daemon=True)
        self.backend: Backend = backend if backend is not None else LocalBackend()
        self.register = register          # write the instance file other processes find
        self.controller: Controller | None = None
        self.runtime: Runtime | None = None
        self._server: asyncio.AbstractServer | None = None
        self.closed = False
        self.stopped = threading.Event()     # set once shut down, however that came about
        # On a cluster: each kind's proxy options and the nodes that have its proxies.
        self._node_proxies: dict[str, tuple[Any, set[str]]] = {}
        self._node_watch: asyncio.Task[None] | None = None
        self._proxy_starts: set[asyncio.Task[Any]] = set()
        # every proxy this instance started, by (kind, index): watched and started again
        # when it dies; the listening sockets several HTTP proxies share are kept open here
        # for the instance's life, so that a replacement gets the same socket
        self._proxy_slots: dict[tuple[str, int], ProxySlot] = {}
        self._proxy_watch: asyncio.Task[None] | None = None
        self._shared_sockets: list[Any] = []
        self.owned = True
        # every process's log file goes here (fleet/_logs.py)
        self.logs_dir = _logs.instance_dir(os.path.basename(self.dir),
                                           self.logging_config.logs_dir)
        self._log_handler: _logs.SinkHandler | None = None
        # A detached controller's (ray_actors.ControllerActor): the state it left when it
        # died, to recover; set once it listens; where each checkpoint goes.
        self.recover: dict[str, Any] | None = None
        self.listening: threading.Event | None = None
        self.save_state: Callable[[bytes], None] | None = None
        self.adopter: Adopting | None = None        # the backend, as one that adopts
        self._saving: asyncio.Task[None] | None = None
        self._save_again = False
        # start() without waiting for the proxies (fleet run: they start while the
        # application's replicas do): what wait_proxies() waits for
        self.wait_for_proxies = True
        self._proxies_up: asyncio.Future[list[dict[str, Any]]] | None = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run coro on the instance's loop and wait for it from this thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        if self.register:
            # an unregistered instance (fleet.testing's, in memory) has no one to read
            # its files: it writes none
            self._log_handler = _logs.setup(self.logs_dir, "controller.log", logger="fleet")
        self.thread.start()
        try:
            self.call(self._start())
        except BaseException:
            if self.recover is not None:
                # a restarted detached controller that failed to recover: what still runs
                # is left as it is, for the next restart to adopt
                self.closed = True
                self.loop.call_soon_threadsafe(self.loop.stop)
                raise
            self.shutdown()
            raise

    async def _start(self) -> None:
        self.controller = Controller(self.backend, self.secret, self.address,
                                     sys_path=list(sys.path), cwd=os.getcwd())
        adopted: list[str] = []
        survivors: set[str] = set()
        if self.recover is not None:
            from fleet._controller import checkpoint
            assert self.adopter is not None
            # the instance's processes alive now, before this controller starts any
            survivors = await self.loop.run_in_executor(None, self.adopter.survivors)
            adopted = checkpoint.restore(self.controller, self.recover, self.adopter.adopt)
            log.info("recovered %d application(s); adopted %d live replica(s)",
                     len(self.controller.apps), len(adopted))
        host = self.backend.listen_host
        if host:
            # replicas and proxies on other nodes reach the controller over TCP
            self._server = await listen(self.controller, self.secret, f"tcp:{host}:0")
            self.address = f"tcp:{host}:{bound_port(self._server)}"
            self.controller.address = self.address
        else:
            self._server = await listen(self.controller, self.secret, self.address)
        if self.listening is not None:
            self.listening.set()
        self.controller.on_shutdown_request = self._shutdown_requested
        self.controller.logs_dir = self.logs_dir if self._log_handler is not None else ""
        self.controller.logging_config = self.logging_config.model_dump()
        self.controller.start()
        self.runtime = Runtime(self.loop, self.address, self.secret)
        # callers on the process's other loops get satellites (Runtime.for_caller); the
        # memory backend's instance (fleet.testing) keeps everything on its own loop
        self.runtime.satellites = self.backend.name in ("local", "ray")
        await self.runtime.connect_controller(subscribe=True)
        bind(self.runtime)
        waits = []
        restored: set[str] = set()      # kinds of proxies a restarted controller had
        if self.recover is not None:
            saved = self.recover.get("proxies", [])
            restored = {p["kind"] for p in saved}
            adopted += self._adopt_proxies(saved)
            orphans = survivors - set(adopted)
            if orphans:
                # started by the controller before, after its last checkpoint
                assert self.adopter is not None
                killed = await self.loop.run_in_executor(None, self.adopter.kill_orphans,
                                                         orphans)
                log.info("stopped %d process(es) no record held: %s", len(killed), killed)
        if self.http_options.enabled and self.proxy_location != "Disabled" \
                and "http" not in restored:
            waits.append(self._start_http_proxies(self.http_options))
        if self.grpc_options.enabled and self.proxy_location != "Disabled" \
                and "grpc" not in restored:
            waits.append(self._start_grpc_proxies(self.grpc_options))
        self._proxies_up = asyncio.gather(*waits)
        # read even when nobody waits (a shutdown while they start cancels them)
        self._proxies_up.add_done_callback(_retrieved)
        if self.wait_for_proxies:
            await self._proxies_serve()
        if self.management is not None:
            from fleet._manage.server import serve
            try:
                self.ops, self._mgmt_server = await serve(self, self.management,
                                                          self.management_fallback)
            except OSError as exc:
                raise FleetError(str(exc)) from None
            # beyond this machine's instance file (on Ray: a named actor of the cluster)
            why = await self.loop.run_in_executor(None, self.backend.publish, {
                "pid": os.getpid(), "node": self.backend.listen_host, "started": time.time(),
                "management": self._management_record(), "token": self.ops.token})
            if why:
                logging.getLogger("fleet.instance").warning("%s", why)
        if self.register:
            self._write_instance_file()
        if self.save_state is not None:
            # checkpoints from now on: with the proxies (started or adopted) in them
            self.controller.on_state_change = self._save_soon
            self._save_soon()

    async def _proxies_serve(self) -> None:
        assert self._proxies_up is not None
        for info in await self._proxies_up:
            if "error" in info:
                raise FleetError(info["error"])

    def wait_proxies(self) -> None:
        """Wait until the proxies serve (when start() did not); FleetError saying why
        one cannot."""
        if self._proxies_up is not None and not self.closed:
            self.call(self._proxies_serve())

    # -- a detached controller's state ---------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        """What a restarted detached controller needs: the controller's state
        (checkpoint.snapshot) and the proxies it keeps running."""
        from fleet._controller import checkpoint
        assert self.controller is not None
        state = checkpoint.snapshot(self.controller)
        state["proxies"] = [{"kind": s.kind, "index": s.index, "options": s.options,
                             "shared": s.shared, "node_id": s.node_id, "pid": s.pid,
                             "key": _proxy_key(s.kind, s.index)}
                            for s in self._proxy_slots.values()]
        state["node_proxies"] = {kind: (options, sorted(nodes))
                                 for kind, (options, nodes) in self._node_proxies.items()}
        state["instance_id"] = self.extra_info.get("instance_id")
        state["management_port"] = self.ops.port if self.ops is not None else None
        return state

    def _save_soon(self) -> None:
        """Save a checkpoint off the loop; one write at a time, the latest state last."""
        if self._saving is not None:
            self._save_again = True
            return
        self._saving = self.loop.create_task(self._save())

    async def _save(self) -> None:
        try:
            while self.save_state is not None and not self.closed:
                self._save_again = False
                state, save = self._snapshot(), self.save_state
                try:
                    # pickled off the loop too: plans may be large
                    await self.loop.run_in_executor(None, _pickle_and_save, save, state)
                except Exception:  # noqa: BLE001 - the next change tries again
                    log.exception("could not save the controller's checkpoint")
                if not self._save_again:
                    return
        finally:
            self._saving = None

    def _adopt_proxies(self, saved: list[dict[str, Any]]) -> list[str]:
        """A restarted controller keeps the proxies that still run (they reconnect and
        report themselves again) and starts the others again; the keys adopted."""
        assert self.recover is not None and self.controller is not None
        assert self.adopter is not None
        adopt = self.adopter.adopt
        adopted = []
        for p in saved:
            kind, index, node_id = p["kind"], p["index"], p["node_id"]
            proc = adopt(p["key"], "")
            if proc is None:
                if not self._node_is_live(node_id):
                    continue
                task = self.loop.create_task(self._start_proxy(kind, p["options"], index,
                                                               shared=p["shared"],
                                                               node_id=node_id))
                self._proxy_starts.add(task)
                task.add_done_callback(self._proxy_starts.discard)
                continue
            adopted.append(p["key"])
            if node_id:
                self.controller.place_proxy(kind, index, node_id)
            self._proxy_slots[(kind, index)] = ProxySlot(
                kind, index, p["options"], None, p["shared"], node_id, proc, p["pid"],
                self.loop.time())
        for kind, (options, nodes) in (self.recover.get("node_proxies") or {}).items():
            self._node_proxies[kind] = (options, set(nodes))
        if self._proxy_slots and self._proxy_watch is None:
            self._proxy_watch = self.loop.create_task(self._watch_proxies())
        if self._node_proxies and self.proxy_location == "EveryNode" \
                and self._node_watch is None:
            self._node_watch = self.loop.create_task(self._follow_nodes())
        return adopted

    async def _start_node_proxies(self, kind: str, options: Any) -> dict[str, Any]:
        """On a cluster: num_proxies proxies per node (proxy_location EveryNode) or on the
        head node only (HeadOnly), all on one port; proxies sharing a host share it
        (SO_REUSEPORT), so the kernel spreads a node's connections over its proxies."""
        nodes = self.backend.nodes()
        if self.proxy_location == "HeadOnly":
            nodes = nodes[:1]
        first = await self._start_proxy(kind, options, 0, node_id=nodes[0]["node_id"])
        if "error" in first:
            return first
        same_port = options.model_copy(update={"port": first["port"]})
        self._node_proxies[kind] = (same_port, {n["node_id"] for n in nodes})
        wanted = [(node["node_id"], j) for node in nodes
                  for j in range(_proxies_on(options, node))][1:]   # the first one runs
        infos = await asyncio.gather(*[
            self._start_proxy(kind, same_port, index, node_id=node_id)
            for index, (node_id, _) in enumerate(wanted, 1)])
        if self.proxy_location == "EveryNode" and self._node_watch is None:
            self._node_watch = self.loop.create_task(self._follow_nodes())
        return next((i for i in infos if "error" in i), first)

    async def _follow_nodes(self) -> None:
        """EveryNode: a node that joins the cluster gets its proxies too (a node that
        leaves takes its proxies with it)."""
        # above the indexes of the proxies started with the instance (or adopted)
        index = max([100_000, *(i for _, i in self._proxy_slots)])
        while not self.closed:
            await asyncio.sleep(NODE_WATCH_S)
            live = {n["node_id"]: n for n in self.backend.nodes()}
            for kind, (options, nodes) in self._node_proxies.items():
                nodes &= set(live)
                for node_id in set(live) - nodes:
                    nodes.add(node_id)
                    for _ in range(_proxies_on(options, live[node_id])):
                        index += 1
                        task = self.loop.create_task(self._start_proxy(kind, options, index,
                                                                       node_id=node_id))
                        self._proxy_starts.add(task)
                        task.add_done_callback(self._proxy_starts.discard)

    async def _start_http_proxies(self, options: HTTPOptions) -> dict[str, Any]:
        if self.backend.listen_host:
            return await self._start_node_proxies("http", options)
        count = proxy_count(options.num_proxies)
        if count == 1:
            return await self._start_proxy("http", options)
        # Several proxies share one listening socket, bound here once: a port another
        # process holds fails as it does for one proxy, and nothing else can join it
        # (SO_REUSEPORT would let a second instance share the port silently).
        from fleet._proxy.startup import bind_socket, cannot_listen
        try:
            sock = bind_socket(options.host, options.port)
        except OSError as exc:
            return {"error": cannot_listen("HTTP", options.host, options.port, exc)}
        # kept open until shutdown: a proxy that dies is replaced on this same socket
        self._shared_sockets.append(sock)
        infos = await asyncio.gather(*[
            self._start_proxy("http", options, index, sock.fileno())
            for index in range(count)])
        return next((i for i in infos if "error" in i), infos[0])

    async def _start_grpc_proxies(self, options: GRPCOptions) -> dict[str, Any]:
        if self.backend.listen_host:
            return await self._start_node_proxies("grpc", options)
        count = proxy_count(options.num_proxies)
        # grpc.aio binds its ports itself: several proxies share the port with
        # SO_REUSEPORT, and a port another process holds makes grpc's core log its own
        # lines before it fails. So that port is found first, with a socket that asks
        # for no sharing, and is one line.
        if options.port:
            from fleet._proxy.startup import bind_socket, cannot_listen
            try:
                bind_socket(options.host, options.port).close()
            except OSError as exc:
                return {"error": cannot_listen("gRPC", options.host, options.port, exc)}
        if count == 1:
            return await self._start_proxy("grpc", options)
        first = await self._start_proxy("grpc", options, 0, shared=True)
        if "error" in first:
            return first
        same_port = options.model_copy(update={"port": first["port"]})
        infos = await asyncio.gather(*[self._start_proxy("grpc", same_port, index,
                                                         shared=True)
                                       for index in range(1, count)])
        return next((i for i in infos if "error" in i), first)

    async def _start_proxy(self, kind: str, options: Any, index: int = 0,
                           listen_fd: int | None = None, shared: bool = False,
                           node_id: str = "") -> dict[str, Any]:
        """Start a proxy and wait until it serves (or says why it cannot); from then on
        it is watched and started again, on the same port, whenever it dies."""
        info, proc = await self._spawn_proxy(kind, options, index, listen_fd, shared,
                                             node_id)
        if "error" in info or self.closed:
            return info
        if not getattr(options, "port", 0) and info.get("port"):
            options = options.model_copy(update={"port": info["port"]})
        self._proxy_slots[(kind, index)] = ProxySlot(
            kind, index, options, listen_fd, shared, node_id, proc, info.get("pid"),
            self.loop.time())
        if self.save_state is not None:
            self._save_soon()
        if self._proxy_watch is None:
            self._proxy_watch = self.loop.create_task(self._watch_proxies())
        return info

    async def _spawn_proxy(self, kind: str, options: Any, index: int,
                           listen_fd: int | None, shared: bool, node_id: str,
                           timeout_s: float | None = None) -> tuple[dict[str, Any], Any]:
        """Start one proxy process (or actor) and wait for its report: (what it reported
        or an "error", the process). With timeout_s, one that neither serves nor exits by
        then is killed."""
        assert self.controller is not None
        waiter = self.controller.expect_proxy(kind, index, node_id)
        boot = {"kind": kind, "controller_address": self.address, "secret": self.secret,
                # the checked options' values, so the proxy process needs no pydantic
                "options": cloudpickle.dumps(types.SimpleNamespace(**dict(options))),
                "sys_path": list(sys.path),
                "index": index, "listen_fd": listen_fd, "shared": shared,
                "logs_dir": self.logs_dir if self._log_handler is not None else "",
                "logging_config": self.logging_config.model_dump(),
                "node_id": node_id}
        proc = self.backend.spawn(_proxy_key(kind, index), "fleet._proxy", boot,
                                  () if listen_fd is None else (listen_fd,))
        deadline = None if timeout_s is None else self.loop.time() + timeout_s
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(waiter), 0.1), proc
            except asyncio.TimeoutError:
                if not proc.alive():
                    return {"error": f"the {kind} proxy process exited with code "
                                     f"{proc.exit_code()} before serving; see its output "
                                     "above"}, proc
                if deadline is not None and self.loop.time() > deadline:
                    self.backend.kill(proc)
                    return {"error": f"the {kind} proxy did not report serving within "
                                     f"{timeout_s:g} s; it was killed"}, proc

    async def _watch_proxies(self) -> None:
        """Start again every proxy that died, each in a task of its own (none waits for
        another): a local process that exited, a Ray actor that died on a live node."""
        while not self.closed:
            await asyncio.sleep(PROXY_WATCH_S)
            for slot in list(self._proxy_slots.values()):
                if slot.restarting or slot.proc.alive():
                    continue
                if self.closed or (self.controller is not None
                                   and self.controller.is_going_down()):
                    return      # a stop signal to the process group stops proxies too
                slot.restarting = True
                task = self.loop.create_task(self._restart_proxy(slot))
                self._proxy_starts.add(task)
                task.add_done_callback(self._proxy_starts.discard)

    def _node_is_live(self, node_id: str) -> bool:
        return not node_id or any(n["node_id"] == node_id for n in self.backend.nodes())

    async def _restart_proxy(self, slot: ProxySlot) -> None:
        """Start a proxy that died again, with its kind, index, options, port (and node),
        backing off while it keeps failing; until it serves, or the instance closes, or
        its node is gone."""
        port = slot.options.port
        code = slot.proc.exit_code()
        if self.loop.time() - slot.serving_since >= PROXY_STABLE_S:
            slot.failures = 0
        delay = restart_delay(slot.failures)
        log.warning("the %s (pid %s) exited with code %s; starting a new one on port %s "
                    "in %.1f s", slot.name, slot.pid, code, port, delay)
        while not self.closed:
            await asyncio.sleep(delay)
            if self.closed:
                return
            if not self._node_is_live(slot.node_id):
                log.info("the %s is not started again: its node left the cluster", slot.name)
                self._proxy_slots.pop((slot.kind, slot.index), None)
                return
            slot.failures += 1
            info, proc = await self._spawn_proxy(slot.kind, slot.options, slot.index,
                                                 slot.listen_fd, slot.shared, slot.node_id,
                                                 PROXY_START_TIMEOUT_S)
            if self.closed:
                return
            slot.proc = proc
            if "error" not in info:
                old_pid, slot.pid = slot.pid, info.get("pid")
                slot.serving_since = self.loop.time()
                slot.restarting = False
                if self.save_state is not None:
                    self._save_soon()
                message = (f"the {slot.name} (pid {old_pid}) exited with code {code}; "
                           f"pid {slot.pid} serves port {info.get('port', port)} now")
                log.info("%s", message)
                if self.controller is not None:
                    self.controller.events.add("proxy_restarted", message=message)
                return
            delay = restart_delay(slot.failures)
            log.warning("the %s could not start again on port %s: %s; trying again in "
                        "%.1f s", slot.name, port, info["error"], delay)

    def _write_instance_file(self) -> None:
        _rundir.live_instances()        # removes the files of instances that are gone
        _rundir.write_instance(self.record())

    def record(self) -> dict[str, Any]:
        """How another process reaches this instance (its instance file's content):
        the controller's address and secret, the proxies' options, the management API."""
        info: dict[str, Any] = {"address": self.address, "secret": self.secret.hex(),
                                "pid": os.getpid(), "started": time.time(),
                                "options": {"http": _comparable(self.http_options),
                                            "grpc": _comparable(self.grpc_options)},
                                "backend": self.backend.name,
                                "ray_address": self.ray_address}
        if self.ops is not None:
            info["management"] = self._management_record()
            info["token"] = self.ops.token
        info.update(self.extra_info)
        return info

    def _management_record(self) -> dict[str, Any]:
        """Where the management API listens, as other processes find it."""
        return {"host": self.ops.host, "port": self.ops.port, "scheme": self.ops.scheme,
                "url": self.ops.url()}

    @property
    def management_info(self) -> dict[str, Any] | None:
        """Where the management API listens, or None when it is off."""
        return None if self.ops is None else {"url": self.ops.url()}

    def dashboard_url(self) -> str | None:
        """The management server's address with the token, or None when it is off."""
        if self.ops is None:
            return None
        return f"{self.ops.url()}/?token={self.ops.token}"

    def _shutdown_requested(self) -> None:
        # Called on the loop; shutting down joins the loop's thread, so not from it.
        threading.Thread(target=_shutdown_owned, args=(self,), name="fleet-shutdown",
                         daemon=True).start()

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
        for sock in self._shared_sockets:
            sock.close()
        self._shared_sockets.clear()
        if self._log_handler is not None:
            logging.getLogger("fleet").removeHandler(self._log_handler)
            self._log_handler.close_file()
            self._log_handler = None
        if self.runtime is not None:
            unbind(self.runtime)
        _rundir.remove_instance()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.stopped.set()

    async def _shutdown(self) -> None:
        saving, self.save_state = self._saving, None       # no checkpoint from now on
        if saving is not None:
            await asyncio.wait({saving}, timeout=10)        # one being written ends first
        if self._mgmt_server is not None:
            self.ops.closing.set()
            await self._mgmt_server.stop()
        if self._node_watch is not None:
            self._node_watch.cancel()
        if self._proxy_watch is not None:
            self._proxy_watch.cancel()
        for task in list(self._proxy_starts):
            task.cancel()
        if self._proxies_up is not None and not self._proxies_up.done():
            self._proxies_up.cancel()       # still starting (fleet run's)
        if self.runtime is not None:
            self.runtime.close("fleet was shut down before this call reached a replica")
        if self.controller is not None:
            await self.controller.close()
        if self.runtime is not None and self.runtime.controller is not None:
            self.runtime.controller.close()
        if self._server is not None:
            self._server.close()
        for conn in list(self.controller.subscribers if self.controller else []):
            conn.close()
        await self.backend.shutdown()


class AttachedInstance:
    """A running instance of another process on this machine, reached from this one:
    its controller over its socket, and this process's own runtime (tables, routers,
    connections to replicas), so handles here are as direct as the owner's."""

    owned = False

    def __init__(self, info: dict[str, Any]) -> None:
        self.address = str(info["address"])
        self.secret = bytes.fromhex(info["secret"])
        self.pid = int(info["pid"])
        options = info.get("options") or {}
        self.options: dict[str, dict[str, Any]] = {"http": options.get("http") or {},
                                                   "grpc": options.get("grpc") or {}}
        try:
            import uvloop
            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet-attached",
                                       daemon=True)
        self.runtime: Runtime | None = None
        self.closed = False
        self.grpc_options = GRPCOptions(enabled=bool(self.options["grpc"].get("enabled")))
        found = info.get("management")
        self.management_info = {"url": found["url"]} if isinstance(found, dict) \
            and "url" in found else None
        self.backend_name = str(info.get("backend") or "local")
        self.ray_address: str | None = info.get("ray_address")
        # a detached controller on Ray: this process rejoins it when it restarts, and
        # shutdown() ends it (its actor) rather than a process of this machine
        self.detached = bool(info.get("detached"))
        self.gcs_address: str | None = info.get("gcs_address")

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run coro on this process's loop for the instance and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def attach(self) -> None:
        if self.detached:
            # its controller is an actor: this process joins the cluster to find it again
            from fleet._backends import ray as ray_backend
            ray_backend.connect(self.gcs_address or self.ray_address)
        self.thread.start()
        try:
            self.call(self._connect(), timeout=30)
        except BaseException:
            self.detach()
            raise

    async def _connect(self) -> None:
        self.runtime = Runtime(self.loop, self.address, self.secret)
        self.runtime.satellites = True
        self.runtime.on_controller_lost = self._lost
        if self.detached:
            from fleet._backends.ray_actors import find_controller
            self.runtime.find_controller = find_controller
        await self.runtime.connect_controller(subscribe=True)
        status = await self.runtime.call_controller("status")
        for kind in ("http", "grpc"):       # where it actually listens (port 0 picks one)
            proxy = status.get("proxies", {}).get(kind)
            if proxy:
                self.options[kind].update(host=proxy["host"], port=proxy["port"])
        bind(self.runtime)

    def _lost(self) -> None:
        self.closed = True              # the owner stopped: the next call looks again

    def detach(self) -> None:
        """Leave the instance running; close this process's connections to it."""
        if self.closed and not self.thread.is_alive():
            return
        self.closed = True
        if self.thread.is_alive():
            async def close() -> None:
                if self.runtime is not None:
                    self.runtime.stop_rejoining()
                    self.runtime.close("this process detached from the fleet instance")
                    if self.runtime.controller is not None:
                        self.runtime.controller.close()
            try:
                self.call(close(), timeout=10)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        if self.runtime is not None:
            unbind(self.runtime)

    def shutdown(self) -> None:
        """Stop the instance itself (its owner shuts it down), then detach."""
        if not self.closed and self.runtime is not None:
            runtime = self.runtime

            async def ask() -> None:
                runtime.stop_rejoining()
                await runtime.call_controller("shutdown_instance")
            try:
                self.call(ask(), timeout=30)
            except Exception:
                pass
            if self.detached:
                from fleet._backends import ray as ray_backend
                if not ray_backend.wait_controller_gone(ray_backend.import_ray(), 60):
                    logging.getLogger("fleet").warning(
                        "the fleet controller on the Ray cluster did not stop within 60 s")
            else:
                _wait_gone(self.pid, 60)
        self.detach()


def _wait_gone(pid: int, timeout_s: float) -> None:
    """Wait until the owner of an instance removed its instance file (or died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(int(info["pid"]) != pid for _, info in _rundir.live_instances()):
            return
        time.sleep(0.05)


def _comparable(options: Any) -> dict[str, Any]:
    """The options another process can compare with its own: plain values only."""
    return {k: v for k, v in options.model_dump().items()
            if isinstance(v, (str, int, float, bool, type(None)))}


_instance: Instance | AttachedInstance | None = None
_lock = threading.RLock()


def _running_elsewhere() -> AttachedInstance | None:
    """The newest live instance of another process of this user, attached; or None."""
    for _path, info in _rundir.live_instances():
        if int(info.get("pid", 0)) == os.getpid():
            continue
        inst = AttachedInstance(info)
        try:
            inst.attach()
        except Exception:
            continue                     # gone meanwhile, or not answering: try the next
        return inst
    return None


def _current_instance(create: bool = True) -> Instance | AttachedInstance:
    """This process's instance, else one running on this machine (attached), else a new
    one when create is true."""
    global _instance
    with _lock:
        if _instance is not None and _instance.closed and getattr(_instance, "detached", False):
            # the detached controller it used did not come back in time: look again
            _instance = _on_cluster(_instance.ray_address)
        if _instance is None or _instance.closed:
            _instance = _running_elsewhere()
        if _instance is None:
            if not create:
                raise FleetError("no fleet instance is running on this machine for this user; "
                                 "start one with fleet.start() or `fleet run`")
            start()
        assert _instance is not None
        return _instance


def _differences(given: Any, running: dict[str, Any], section: str) -> list[str]:
    """The options a caller set explicitly that differ from the running instance's."""
    out = []
    for key in sorted(given.model_fields_set):
        value = getattr(given, key)
        if key not in running or not isinstance(value, (str, int, float, bool, type(None))):
            continue
        if key == "port" and value == 0:        # "any free port" is whatever it has
            continue
        if running[key] != value:
            out.append(f"{section}.{key}={running[key]!r} (asked for {value!r})")
    return out


BACKENDS = ("local", "ray")
PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")


def make_backend(backend: str, ray_address: str | None,
                 runtime_env: dict[str, Any] | None = None) -> Backend:
    """The backend named backend: "local" (child processes) or "ray" (actors of the Ray
    cluster at ray_address, with runtime_env for all of them)."""
    if backend == "local":
        if ray_address is not None:
            raise ValueError("ray_address applies to backend='ray' only")
        return LocalBackend()
    if backend == "ray":
        from fleet._backends.ray import RayBackend
        return RayBackend(ray_address, runtime_env)
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, "
                     f"got {backend!r}")


def _check_same_backend(inst: Instance | AttachedInstance, backend: str | None,
                        ray_address: str | None) -> None:
    """Refuse a start() that asks for another backend or cluster than the running one."""
    running = inst.backend.name if isinstance(inst, Instance) else inst.backend_name
    where = "this process" if isinstance(inst, Instance) else f"pid {inst.pid}"
    if backend is not None and backend != running:
        raise FleetError(f"a fleet instance with backend={running!r} already runs ({where}); "
                         f"fleet.start(backend={backend!r}) cannot change it: stop it first "
                         "(fleet.shutdown() or `fleet shutdown`)")
    if isinstance(inst, AttachedInstance) and inst.detached:
        # found on this machine or through the cluster: the same cluster unless an
        # address is named that is neither the one it was started with nor its GCS's
        if ray_address in (None, "auto", inst.ray_address, inst.gcs_address):
            return
    if ray_address is not None and ray_address != inst.ray_address:
        raise FleetError(f"a fleet instance already runs ({where}) on the Ray cluster at "
                         f"ray_address={inst.ray_address!r}; fleet.start(ray_address="
                         f"{ray_address!r}) cannot move it: stop it first "
                         "(fleet.shutdown() or `fleet shutdown`)")


def build_detached(settings: dict[str, Any], secret: bytes, instance_id: str) -> Instance:
    """In the detached controller's actor (``ray_actors.ControllerActor``): its instance,
    not started, with the checkpoint a controller that died left (to recover) and where
    its own checkpoints go."""
    global _instance
    from fleet._backends import ray as ray_backend
    from fleet._backends import ray_actors
    backend = ray_backend.RayBackend(None, None, detached=instance_id)
    state = ray_actors.load_state()
    if state is not None and state.get("instance_id") != instance_id:
        ray_actors.drop_state()             # an instance's that ended without removing it
        state = None
    management = settings["management"]
    if state is not None and not management.port and state.get("management_port"):
        # restarted: the management API where it was (a free one if that port is taken)
        management = management.model_copy(update={"port": state["management_port"]})
    # registered as any instance is (its node's instance file, its log files), so the
    # CLI on that machine finds it, token included, as it finds a local one
    inst = Instance(settings["http"], settings["grpc"], backend,
                    management=management,
                    management_fallback=settings["management_fallback"] or state is not None,
                    logging_config=settings["logging_config"],
                    proxy_location=settings["proxy_location"],
                    ray_address=settings["ray_address"])
    inst.secret = secret                # the same after a restart: replicas rejoin with it
    inst.extra_info = {"detached": True, "instance_id": instance_id,
                       "gcs_address": ray_backend.gcs_address()}
    inst.recover = state
    inst.save_state = ray_actors.save_state
    inst.adopter = backend
    _instance = inst                    # what fleet's functions act on in this process
    return inst


def _need_cluster(ray_address: str | None) -> None:
    """A detached controller needs a cluster that outlives this process: not the Ray of
    its own that ray.init starts when no address is given."""
    import importlib.util
    if ray_address or os.environ.get("RAY_ADDRESS") or "ray" not in sys.modules \
            and importlib.util.find_spec("ray") is None:
        return          # (without Ray, connect says how to install it)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    raise FleetError("a detached controller needs a running Ray cluster: start one (`ray "
                     "start --head`) and pass its address as ray_address (or "
                     "--ray-address), or set RAY_ADDRESS")


def start_detached(http: HTTPOptions, grpc: GRPCOptions, management: ManagementOptions,
                   logging_config: LoggingConfig | None, ray_address: str | None,
                   proxy_location: str = "EveryNode") -> dict[str, Any]:
    """Start the detached controller on the Ray cluster at ray_address (``fleet start
    --backend ray``), or find the one there; its info (ray_actors.ControllerActor)."""
    from fleet._backends import ray as ray_backend
    _need_cluster(ray_address)
    # the command returns at once: the actors' output is the cluster's, not its own
    ray, _joined = ray_backend.connect(ray_address, quiet=True)
    return ray_backend.start_detached_controller(ray, build_detached, _detached_settings(
        http, grpc, management, False, logging_config, proxy_location, ray_address))


def _detached_settings(http: HTTPOptions, grpc: GRPCOptions, management: ManagementOptions,
                       fallback: bool, logging_config: LoggingConfig | None,
                       proxy_location: str, ray_address: str | None) -> dict[str, Any]:
    """What a detached controller is made with (the same again at each restart): its
    management token is chosen here, once, so it stays the same when it restarts."""
    if management.token is None:
        management = management.model_copy(update={"token": secrets.token_urlsafe(32)})
    return {"http": http, "grpc": grpc, "management": management,
            "management_fallback": fallback, "logging_config": logging_config,
            "proxy_location": proxy_location, "ray_address": ray_address}


def _on_cluster(ray_address: str | None, settings: dict[str, Any] | None = None
                ) -> AttachedInstance | None:
    """The detached controller of the Ray cluster at ray_address, attached; made with
    settings when there is none and settings are given; else None."""
    from fleet._backends import ray as ray_backend
    if settings is not None:
        _need_cluster(ray_address)
    ray, _joined = ray_backend.connect(ray_address)
    if settings is not None:
        info = ray_backend.start_detached_controller(ray, build_detached, settings)
    else:
        found = ray_backend.detached_controller(ray)
        if found is None or not found[1].get("detached"):
            return None             # none, or a driver's instance: this one starts its own
        info = found[1]
    if isinstance(_instance, AttachedInstance):
        _instance.detach()          # the one it replaces (its controller did not come back)
    inst = AttachedInstance(info)
    inst.ray_address = ray_address
    inst.attach()
    return inst


def start(http_options: dict[str, Any] | HTTPOptions | None = None,
          grpc_options: dict[str, Any] | GRPCOptions | None = None,
          management_options: dict[str, Any] | ManagementOptions | None = None,
          logging_config: dict[str, Any] | LoggingConfig | None = None,
          backend: str | None = None, ray_address: str | None = None,
          proxy_location: str = "EveryNode", detached: bool = False) -> None:
    """Start fleet's instance in this process: the controller, the backend and the
    HTTP proxy (``http_options``: host, port, middlewares, request_timeout_s, root_path,
    max_body_bytes, access_log) and, when ``grpc_options`` is given, the gRPC proxy.
    ``logging_config`` (log_level, encoding, enable_access_log, logs_dir) is the
    instance's: the proxies', and every deployment's that sets none of its own.

    ``backend="local"`` (the default) runs replicas and proxies as child processes of
    this one; ``backend="ray"`` runs them as actors of the Ray cluster at
    ``ray_address`` (``"auto"``, ``"host:port"`` or ``"ray://host:10001"``; by default
    ``RAY_ADDRESS``, else a Ray of its own, as ``ray.init`` does), with a proxy on every
    node (``proxy_location="EveryNode"``), on the head node only (``"HeadOnly"``) or
    none (``"Disabled"``).

    When an instance already runs on this machine (this process's, or another's, such as
    a ``fleet run``), this process uses it instead, and options that differ from the
    running instance's raise a :class:`fleet.FleetError` naming the difference; so does
    asking for another backend or Ray address than it has.
    ``fleet.run`` calls it with defaults (HTTP on 127.0.0.1:8000) when needed.

    ``management_options`` (host, port, metrics_public, token) also starts the
    management server (REST API, as ``fleet run`` and ``fleet start`` do); from Python it
    runs only when asked. A port already in use raises :class:`fleet.FleetError`.

    ``detached=True`` (Ray only) runs the controller as a detached actor of the cluster,
    named ``fleet-controller`` in namespace ``fleet``: applications keep serving after
    this process exits, any process that joins the cluster reaches them with
    ``fleet.start(backend="ray")``, and Ray restarts the controller if it dies; it
    recovers its applications from a checkpoint and adopts the replicas and proxies that
    still run. Its management server is on (a free port when 8100 is taken).
    ``fleet.shutdown()`` from any of those processes ends it.
    """
    global _instance
    management = None if management_options is None else coerce_options(
        ManagementOptions, management_options, "management_options")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"fleet.start: backend must be one of "
                         f"{', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if proxy_location not in PROXY_LOCATIONS:
        raise ValueError(f"fleet.start: proxy_location must be one of "
                         f"{', '.join(map(repr, PROXY_LOCATIONS))}, got {proxy_location!r}")
    http = coerce_options(HTTPOptions, http_options, "http_options")
    grpc_given = grpc_options is not None
    grpc = coerce_options(GRPCOptions, grpc_options, "grpc_options")
    if grpc_given and (not isinstance(grpc_options, dict) or "enabled" not in grpc_options):
        grpc.enabled = True
    log_cfg = None if logging_config is None else coerce_options(
        LoggingConfig, logging_config, "logging_config")
    if detached and backend != "ray":
        raise ValueError("fleet.start: detached=True runs the controller on a Ray cluster; "
                         "pass backend='ray' too")
    with _lock:
        if _instance is None or _instance.closed:
            _instance = _running_elsewhere()
        if _instance is None and backend == "ray":
            # the cluster's detached controller when it has one (made when detached)
            settings = None if not detached else _detached_settings(
                http, grpc, management or ManagementOptions(), management is None, log_cfg,
                proxy_location, ray_address)
            _instance = _on_cluster(ray_address, settings)
        if _instance is not None:
            _check_same_backend(_instance, backend, ray_address)
            if detached and not getattr(_instance, "detached", False):
                raise FleetError("a fleet instance owned by a process already runs (fleet.run "
                                 "or fleet.start without detached=True); detached=True cannot "
                                 "change it: stop it first (fleet.shutdown())")
            if isinstance(_instance, AttachedInstance):
                diff = (_differences(http, _instance.options["http"], "http_options")
                        + _differences(grpc, _instance.options["grpc"], "grpc_options"))
                if diff:
                    where = "on the Ray cluster" if _instance.detached else "on this machine"
                    raise FleetError(
                        f"a fleet instance already runs {where} (pid {_instance.pid}) "
                        f"with other options: {', '.join(diff)}; use it as it is, or stop "
                        "it first (fleet.shutdown() or `fleet shutdown`)")
            if management is not None and getattr(_instance, "ops", True) is None:
                raise FleetError("this process's fleet instance runs no management server; "
                                 "pass management_options to the first fleet.start()")
            return
        start_owned(http, grpc, management, logging_config=log_cfg,
                    backend=backend or "local", ray_address=ray_address,
                    proxy_location=proxy_location)


def start_owned(http: HTTPOptions, grpc: GRPCOptions,
                management: ManagementOptions | None = None,
                management_fallback: bool = False,
                extra_info: dict[str, Any] | None = None,
                logging_config: LoggingConfig | None = None,
                backend: str = "local", ray_address: str | None = None,
                proxy_location: str = "EveryNode",
                runtime_env: dict[str, Any] | None = None,
                wait_proxies: bool = True) -> Instance:
    """Start an instance owned by this process, whatever else runs (``fleet run``);
    without wait_proxies, it returns once its proxies are starting (``wait_proxies()``
    waits for them)."""
    global _instance
    with _lock:
        if isinstance(_instance, Instance) and not _instance.closed:
            _check_same_backend(_instance, backend, ray_address)
            return _instance
        if isinstance(_instance, AttachedInstance):
            _instance.detach()
        inst = Instance(http, grpc, make_backend(backend, ray_address, runtime_env),
                        management=management,
                        management_fallback=management_fallback,
                        logging_config=logging_config,
                        proxy_location=proxy_location, ray_address=ray_address)
        inst.extra_info = dict(extra_info or {})
        inst.wait_for_proxies = wait_proxies
        inst.start()
        _instance = inst
        return inst


def _shutdown_owned(inst: Instance) -> None:
    global _instance
    with _lock:
        if _instance is inst:
            _instance = None
    inst.shutdown()


def shutdown() -> None:
    """Stop every application and replica and the proxies; nothing is left running.

    In a process that attached to an instance another process started (a ``fleet run``),
    this stops that instance too, as ``serve.shutdown()`` does.
    """
    global _instance
    with _lock:
        inst, _instance = _instance, None
    if inst is not None:
        inst.shutdown()


def _at_exit() -> None:
    """At interpreter exit: stop this process's own instance; leave others running."""
    global _instance
    with _lock:
        inst, _instance = _instance, None
    if isinstance(inst, AttachedInstance):
        inst.detach()
    elif inst is not None:
        inst.shutdown()


def ensure_grpc_proxy(port: int | None) -> None:
    """Make sure the instance runs its gRPC proxy (on port, when given and no gRPC
    proxy runs yet; a running proxy also listens on a driver's port once it is
    deployed)."""
    with _lock:
        inst = _instance
        if inst is None or inst.closed:
            start(grpc_options={} if port is None else {"port": port})
            return
    if inst.grpc_options.enabled:
        return
    if not isinstance(inst, Instance):
        raise FleetError(f"the fleet instance this process uses (pid {inst.pid}) runs no gRPC "
                         "proxy; start it with `fleet run --grpc-port PORT` or "
                         "fleet.start(grpc_options={...})")
    update: dict[str, Any] = {"enabled": True}
    if port is not None:
        update["port"] = port
    options = inst.grpc_options.model_copy(update=update)
    info = inst.call(inst._start_grpc_proxies(options) if inst.backend.listen_host
                     else inst._start_proxy("grpc", options))
    if "error" in info:
        raise FleetError(info["error"])
    inst.grpc_options = options


atexit.register(_at_exit)
# A handle used before fleet.start() starts an instance with defaults.
set_starter(start)


def _ctl(method: str, *args: Any, create: bool = True) -> Any:
    inst = _current_instance(create)
    assert inst.runtime is not None
    return inst.call(inst.runtime.call_controller(method, *args))



def _prepare_app(app: Application) -> tuple[Application, str, int | None, bool]:
    """fleet.drivers' prepare_app, importing that module (and grpc with it) only when it
    is loaded already: the driver classes live there, so until something imported it no
    application can be a driver, and a plain HTTP app's process never loads grpc."""
    if "fleet.drivers" in sys.modules:
        from fleet.drivers import prepare_app
        return prepare_app(app)
    # an OIP model answers inference.GRPCInferenceService too
    oip = getattr(app.deployment.func_or_class, "_fleet_oip", None) is not None
    return app, "http", None, oip

def run(app: Application, name: str = "default", route_prefix: str | None = "/",
        blocking: bool = False) -> DeploymentHandle:
    """Deploy app under name and wait until every replica is ready; returns the ingress
    deployment's handle. Running an app under an existing name updates it in place:
    deployments whose code and options did not change keep their replicas.

    With ``blocking=True`` it says on stderr what is starting and where the application
    is served, then serves until Ctrl-C or SIGTERM and shuts the instance down.

    Raises :class:`fleet.DeploymentFailedError` (with the replica's traceback) when a
    constructor fails.
    """
    # Before deploying: the route is live before run() returns, and a SIGTERM from then
    # on must shut down cleanly, start-up included.
    stop = _stop_on_sigterm() if blocking else None
    try:
        handle = deploy(app, name, route_prefix, progress=blocking,
                        on_ready=stop.serving if stop is not None else None)
    except KeyboardInterrupt:
        if stop is not None:        # Ctrl-C or SIGTERM while starting: stop everything
            stop.serving()          # (a second signal must not interrupt the shutdown)
            shutdown()
        raise
    if stop is not None:
        stop.serving()
        _print_addresses(status(), name)
        _block(stop.event)
    return handle


def deploy(app: Application, name: str, route_prefix: str | None,
           progress: bool = False, on_ready: Callable[[], None] | None = None,
           before_wait: Callable[[], None] | None = None) -> DeploymentHandle:
    """:func:`run` without blocking; with progress, report start-up on stderr."""
    if not isinstance(app, Application):
        raise TypeError(f"fleet.run expects an Application (Deployment.bind(...)), got "
                        f"{type(app).__name__}")
    if route_prefix is not None and (not isinstance(route_prefix, str)
                                     or not route_prefix.startswith("/")):
        raise ValueError(f"application {name!r}: route_prefix must start with '/' (or be None "
                         f"for no HTTP route), got {route_prefix!r}")
    app, protocol, grpc_port, needs_grpc = _prepare_app(app)  # drivers become plain apps
    if needs_grpc:
        ensure_grpc_proxy(grpc_port)
    plans = build_plans(app, name)
    _deploy(name, route_prefix, plans, protocol, grpc_port, progress, on_ready, before_wait)
    handle = DeploymentHandle(plans[0].name, name)._following_traffic()
    if plans[0].legacy_refs:
        handle = handle._with_legacy_refs()
    return handle


def _deploy(name: str, route_prefix: str | None, plans: list[Any], protocol: str,
            grpc_port: int | None, progress: bool,
            on_ready: Callable[[], None] | None = None,
            before_wait: Callable[[], None] | None = None) -> None:
    """Deploy and wait until ready (then call on_ready at once: the route is live); with
    progress, say on stderr what is starting. before_wait runs once the replicas are
    starting (fleet run waits for its proxies there)."""
    _ctl("deploy", name, route_prefix, plans, protocol, grpc_port,
         {"sys_path": list(sys.path), "cwd": os.getcwd()})
    if before_wait is not None:
        before_wait()
    if not progress:
        _ctl("wait_ready", name)
        if on_ready is not None:
            on_ready()
        return
    _say(f"deploying application {name!r}: "
         + ", ".join(f"{p.name} x{p.config.target_replicas()}" for p in plans))
    done = threading.Event()
    watcher = Progress(name)
    thread = threading.Thread(target=watcher.watch, args=(done,), name="fleet-progress",
                              daemon=True)
    thread.start()
    try:
        _ctl("wait_ready", name)
        if on_ready is not None:
            on_ready()
    finally:
        done.set()
        thread.join(5)
    watcher.update(_app_status(name))


def _say(line: str) -> None:
    print(f"fleet: {line}", file=sys.stderr, flush=True)


def _app_status(name: str) -> dict[str, Any] | None:
    apps: dict[str, Any] = status()["applications"]
    return apps.get(name)


class Progress:
    """Prints each deployment's replicas as they become ready, and what slow ones do."""

    REPORT_AFTER_S = (5, 10, 20, 40, 60, 120, 180, 240, 300)

    def __init__(self, app: str) -> None:
        self.app = app
        self.ready: dict[str, int] = {}
        self.reported_slow: dict[str, int] = {}

    def watch(self, done: threading.Event) -> None:
        while not done.wait(0.25):
            try:
                self.update(_app_status(self.app))
            except Exception:
                return

    def update(self, app: dict[str, Any] | None) -> None:
        if app is None:
            return
        for dep_name, dep in app["deployments"].items():
            running = sum(r["state"] == "RUNNING" for r in dep["replicas"])
            target = dep.get("target_replicas", running)
            if running != self.ready.get(dep_name, 0) and running <= target:
                self.ready[dep_name] = running
                _say(f"{dep_name} {running}/{target} ready")
            starting = [r for r in dep["replicas"] if r["state"] in ("STARTING", "PENDING")]
            if not starting:
                continue
            slowest = max(starting, key=lambda r: r.get("uptime_s", 0))
            age = slowest.get("uptime_s", 0)
            marks = [m for m in self.REPORT_AFTER_S if m <= age]
            if marks and self.reported_slow.get(dep_name) != marks[-1]:
                self.reported_slow[dep_name] = marks[-1]
                doing = slowest.get("message") or "starting"
                _say(f"{dep_name}: {doing} for {int(age)} s")


def _print_addresses(st: dict[str, Any], only: str | None = None) -> None:
    """Where each application is served, on stderr."""
    proxies = st.get("proxies", {})
    http, grpc = proxies.get("http"), proxies.get("grpc")
    for name, app in st["applications"].items():
        if only is not None and name != only:
            continue
        deps = ", ".join(f"{d} x{len(info['replicas'])}"
                         for d, info in app["deployments"].items())
        where = ""
        if app.get("protocol") == "grpc" and grpc:
            where = f" on gRPC {grpc['host']}:{app.get('grpc_port') or grpc['port']}"
        elif http and app["route_prefix"] is not None:
            where = f" at http://{http['host']}:{http['port']}{app['route_prefix']}"
        _say(f"application {name!r} RUNNING{where} ({deps})")


class StopSignals:
    """A handler for SIGTERM and SIGINT: while starting, interrupts the start (as
    KeyboardInterrupt, which also ends a wait on the instance); once serving, sets
    ``event`` for the main loop to stop."""

    def __init__(self) -> None:
        from fleet import _signals
        self.event = threading.Event()
        self._serving = False
        _signals.watch()    # the controller sees the signal before this handler runs

    def serving(self) -> None:
        self._serving = True

    def __call__(self, signum: int, _frame: Any) -> None:
        self.event.set()
        _going_down()
        if not self._serving:
            raise KeyboardInterrupt(f"signal {signum} while starting")


def _going_down() -> None:
    """A stop signal reached this process: its own instance's controller replaces no
    replica from now on (a signal to the process group stops them too, on their own),
    before the main thread gets to shut it down."""
    inst = _instance
    if isinstance(inst, Instance) and inst.controller is not None:
        inst.controller.going_down = True


def _stop_on_sigterm() -> StopSignals:
    import signal
    stop = StopSignals()
    signal.signal(signal.SIGTERM, stop)
    return stop


def _block(stop: threading.Event) -> None:
    """Serve until a signal or until the instance is stopped (from another process, say);
    then stop this process's own instance, or leave an attached one running."""
    inst = _instance
    try:
        while not stop.wait(0.5):
            if inst is None or inst.closed:
                break
    except KeyboardInterrupt:
        pass
    _at_exit()


def delete(name: str) -> None:
    """Delete an application: its replicas stop and its route goes away."""
    _ctl("delete", name, create=False)


def status() -> dict[str, Any]:
    """The instance's state: ``{"applications": {app: {"status", "route_prefix",
    "deployments": {name: {"status", "message", "replicas": [{"replica_id", "state",
    "pid", "message"}]}}}}, "proxies": {...}}``. A deployment whose requests failed also
    has ``"last_error"``: the latest one's ``request_id``, ``error``, ``traceback``, ``at``.
    When the instance serves the management API, ``"management": {"url": ...}`` says where.
    """
    result = dict(_ctl("status", create=False))
    inst = _instance
    management = getattr(inst, "management_info", None)
    if management:
        result["management"] = management
    return result


def get_app_handle(name: str) -> DeploymentHandle:
    """The handle of a running application's ingress deployment. Like HTTP and gRPC
    calls, its calls follow the traffic policy of the route the application serves
    (``set_traffic``'s split, ``shadow_traffic``'s copies)."""
    apps = status()["applications"]
    if name not in apps:
        raise FleetError(f"no application named {name!r}; running: {sorted(apps) or 'none'}")
    return DeploymentHandle(apps[name]["ingress"], name)._following_traffic()


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
