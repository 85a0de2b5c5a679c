"""The Ray backend: replicas and proxies are Ray actors, placed by Ray.

Ray does placement, resources, lifecycle and failure detection; fleet keeps its own data
plane, so no request goes through Ray: callers reach replicas over TCP on the replicas'
node addresses (`fleet/_backends/ray_actors.py`). Ray is imported only when this backend
is asked for, and this module is imported only then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from fleet._types import ReplicaSpec, deployment_key
from fleet.exceptions import FleetError

log = logging.getLogger("fleet.ray")

INSTALL_HINT = "pip install 'fleet[ray]'"
# How long a cluster's address may take to answer before fleet.start gives up.
CONNECT_TIMEOUT_S = 10.0
NAMESPACE = "fleet"
# A replica asks Ray for one CPU unless its ray_actor_options say otherwise, as a Ray
# Serve replica does; proxies ask for none.
DEFAULT_NUM_CPUS = 1.0
# Threads of an actor: one waits for the replica's end, the others answer ready and stop.
ACTOR_CONCURRENCY = 4
NODES_TTL_S = 0.5
# Where an instance on a cluster can be found (see RayBackend.publish).
DIRECTORY_NAME = "fleet-controller"
DIRECTORY_NAMESPACE = "fleet"


def import_ray() -> Any:
    """Ray, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise FleetError(f"backend='ray' needs Ray, which is not installed here: "
                         f"{INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail at once when nothing listens at a cluster address: ray.init keeps retrying
    such an address for minutes."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout_s).close()
    except (OSError, ValueError) as exc:
        raise FleetError(f"no Ray cluster answers at ray_address={address!r} ({exc}); start "
                         "one with `ray start --head` and pass its address (host:port), "
                         "or 'auto' for the cluster this machine belongs to") from None


# Whether fleet joined this process to Ray (and so leaves it when its backend stops).
_joined = False


def connect(address: str | None, runtime_env: dict[str, Any] | None = None,
            quiet: bool = False) -> tuple[Any, bool]:
    """Connect this process to Ray at address (None: RAY_ADDRESS, else a Ray of its
    own on this machine, as ray.init does), with runtime_env for every actor it starts;
    quiet: the actors' output is not copied to this process's. Returns (ray, whether
    this call connected)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        _check_reachable(address, CONNECT_TIMEOUT_S)
    # ray.init replaces the SIGTERM handler with one that exits at once; a `fleet run`
    # (or a script's) handler must stay, so SIGTERM shuts down in order.
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING,
                 configure_logging=False, runtime_env=runtime_env,
                 log_to_driver=not quiet)
    except ConnectionError as exc:
        raise FleetError(f"cannot connect to a Ray cluster at ray_address={address!r}: "
                         f"{str(exc).splitlines()[0]}") from None
    finally:
        if main_thread and handler is not None:
            signal.signal(signal.SIGTERM, handler)
    global _joined
    _joined = True
    return ray, True


def leave(ray: Any) -> None:
    """Leave the Ray cluster fleet joined this process to."""
    global _joined
    _joined = False
    ray.shutdown()


def find_instance(address: str) -> dict[str, Any]:
    """What the instance on the Ray cluster at address published (RayBackend.publish);
    one-line FleetError when Ray is missing, no cluster answers or no instance runs."""
    ray, joined = connect(address)
    try:
        try:
            directory = ray.get_actor(DIRECTORY_NAME, namespace=DIRECTORY_NAMESPACE)
        except ValueError:
            raise FleetError(f"no fleet instance runs on the Ray cluster at ray_address="
                             f"{address!r}; start one with `fleet start --backend ray "
                             f"--ray-address {address}`") from None
        try:
            return dict(ray.get(directory.info.remote(), timeout=CONNECT_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - its owner is exiting
            raise FleetError(f"the fleet instance on the Ray cluster at ray_address="
                             f"{address!r} does not answer: {type(exc).__name__}") from None
    finally:
        if joined:
            leave(ray)


# -- the detached controller (ray_actors.ControllerActor) ----------------------------
# How long a new detached controller may take to be up (Ray starting a worker, the
# proxies on every node).
CONTROLLER_START_S = 120.0


def detached_controller(ray: Any) -> tuple[Any, dict[str, Any]] | None:
    """The actor named fleet-controller and its info, or None when there is none: the
    cluster's detached controller (see ControllerActor.info; "detached" is true), or a
    driver-owned instance's address book (InstanceDirectory)."""
    try:
        actor = ray.get_actor(DIRECTORY_NAME, namespace=DIRECTORY_NAMESPACE)
    except ValueError:
        return None
    try:
        info = dict(ray.get(actor.info.remote(), timeout=CONTROLLER_START_S))
    except Exception as exc:  # noqa: BLE001 - it is going away
        raise FleetError(f"the fleet instance on this Ray cluster does not answer: "
                         f"{type(exc).__name__}") from None
    if "error" in info:
        raise FleetError(f"the fleet controller on this Ray cluster could not start: "
                         f"{info['error']}")
    return actor, info


def start_detached_controller(ray: Any, build: Callable[[dict[str, Any], bytes, str], Any],
                              settings: dict[str, Any]) -> dict[str, Any]:
    """Make the cluster's detached controller (on the head node when it can), wait until
    it serves, and return its info; one already there is used as it is."""
    import secrets

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from fleet._backends import ray_actors
    found = detached_controller(ray)
    if found is not None:
        return _detached_info(found[1])
    actor_class: Any = ray_actors.ControllerActor
    heads = [n["NodeID"] for n in ray.nodes()
             if n.get("Alive") and "node:__internal_head__" in (n.get("Resources") or {})]
    options: dict[str, Any] = {
        "name": DIRECTORY_NAME, "namespace": DIRECTORY_NAMESPACE, "lifetime": "detached",
        "max_restarts": -1, "max_task_retries": -1, "max_concurrency": 16, "num_cpus": 0}
    if heads:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(heads[0], soft=True)
    instance_id = secrets.token_hex(4)
    try:
        actor = actor_class.options(**options).remote(build, settings,
                                                      secrets.token_bytes(32), instance_id)
    except ValueError:              # another process made it meanwhile
        found = detached_controller(ray)
        if found is None:
            raise FleetError("the fleet controller on this Ray cluster went away while "
                             "starting; try again") from None
        return _detached_info(found[1])
    try:
        info = dict(ray.get(actor.info.remote(), timeout=CONTROLLER_START_S))
    except Exception as exc:  # noqa: BLE001 - its constructor failed, or it is slow
        _remove_instance(ray, actor, instance_id)
        first = (str(exc).strip().splitlines() or [""])[0]     # Ray's are multi-line
        raise FleetError(f"the fleet controller did not start on the Ray cluster within "
                         f"{CONTROLLER_START_S:g} s: {type(exc).__name__}: {first}") from None
    if "error" in info:
        # the actor ends itself too, a while after it told why (TOLD_GRACE_S): removed
        # here at once, so that nothing of it is left when this returns
        _remove_instance(ray, actor, instance_id)
        raise FleetError(f"the fleet controller could not start on the Ray cluster: "
                         f"{info['error']}")
    return dict(info, created=True)


def gcs_address() -> str:
    """The address of the cluster this process belongs to (its GCS)."""
    ray = import_ray()
    return str(ray.get_runtime_context().gcs_address)


def _named_after(ray: Any, prefix: str) -> set[str]:
    """What follows prefix in the names of the cluster's live named actors that have it."""
    found = set()
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry.get("name", "") if isinstance(entry, dict) else str(entry)
        if name.startswith(prefix):
            found.add(name[len(prefix):])
    return found


def _remove_instance(ray: Any, actor: Any, instance_id: str) -> None:
    """Everything of a detached controller that did not start in time: the actor, the
    actors it started, its checkpoint."""
    from fleet._backends import ray_actors
    prefix = f"fleet-{instance_id}-"
    handles = [actor]
    for key in _named_after(ray, prefix):
        try:
            handles.append(ray.get_actor(prefix + key, namespace=NAMESPACE))
        except ValueError:
            pass
    for handle in handles:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 - gone already
            pass
    ray_actors.drop_state()


def _detached_info(info: dict[str, Any]) -> dict[str, Any]:
    """info of an actor named fleet-controller that a detached controller can use as its
    own; FleetError when it is a driver-owned instance's."""
    if not info.get("detached"):
        raise FleetError(f"a fleet instance owned by a driver (pid {info.get('pid')}) runs "
                         f"on this Ray cluster and holds the name {DIRECTORY_NAME!r}; stop "
                         "it first (fleet.shutdown() in that process, or `fleet shutdown "
                         "--ray-address ...`)")
    return dict(info, created=False)


def wait_controller_gone(ray: Any, timeout_s: float) -> bool:
    """Wait until the cluster's detached controller ended (after a shutdown)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(DIRECTORY_NAME, namespace=DIRECTORY_NAMESPACE)
        except ValueError:
            return True
        time.sleep(0.1)
    return False


def _demand(options: dict[str, Any]) -> dict[str, float]:
    """What a replica asks of a node, in Ray's resource names."""
    out = {"CPU": float(options.get("num_cpus", DEFAULT_NUM_CPUS))}
    if options.get("num_gpus"):
        out["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        out["memory"] = float(options["memory"])
    for name, amount in (options.get("resources") or {}).items():
        out[name] = float(amount)
    return {k: v for k, v in out.items() if v}


def _fits(demand: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(k, 0.0) >= v for k, v in demand.items())


def _describe(demand: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(demand.items())) or "no resources"


def _from_working_dir(spec: ReplicaSpec, working_dir: Any) -> ReplicaSpec:
    """The spec a replica with a working_dir gets: the driver's paths into that directory
    left out, so the application is imported from the copy Ray shipped to the node (Ray
    puts it on the path), never from a driver's directory that other nodes lack."""
    import dataclasses
    if not isinstance(working_dir, str) or "://" in working_dir:
        return spec
    root = os.path.realpath(working_dir)
    paths = [p for p in spec.sys_path
             if os.path.realpath(p or ".") != root
             and not os.path.realpath(p or ".").startswith(root + os.sep)]
    return dataclasses.replace(spec, sys_path=paths)


class RayProcess:
    """A replica's (or proxy's) actor as the backend tracks it."""

    def __init__(self, replica_id: str, key: str, demand: dict[str, float],
                 per_node: int | None, spec: ReplicaSpec | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.replica_id = replica_id
        self.spec = spec                # what to start (None for a proxy)
        self.options = options or {}    # its ray_actor_options
        self.key = key                  # the deployment's table key (or the proxy's)
        self.demand = demand
        self.per_node = per_node        # max_replicas_per_node, when it has one
        self.actor: Any = None
        self.node = ""                  # the node it was pinned to or reported from
        self._pid: int | None = None
        self.placed = False             # the actor's constructor ran on a node
        self.done = False
        self.code: int | None = None
        self.waiting = ""               # why no actor could be made yet
        # whether no live node could ever hold it (set by the backend)
        self.infeasible: Callable[[], bool] = lambda: False
        self.last_try = 0.0
        self.killed = False
        self.replaced = 0               # times placed again: its node left before it started

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def node_id(self) -> str:
        return self.node if self.placed else ""

    def alive(self) -> bool:
        return not self.done

    def exit_code(self) -> int | None:
        return self.code

    def pending(self) -> str | None:
        if self.placed or self.done:
            return None
        if self.waiting:
            return self.waiting
        text = f"waiting for Ray to place it on a node with {_describe(self.demand)} free"
        if self.infeasible():
            text += ("; no live node has that much: add such a node or lower the "
                     "deployment's ray_actor_options")
        return text

    def _on_ready(self, fut: concurrent.futures.Future[Any]) -> None:
        try:
            self.node, self._pid = fut.result()
            self.placed = True
        except BaseException:  # noqa: BLE001 - the actor died: _on_exit says so
            pass

    def watch(self) -> None:
        """Follow the actor's end: wait() answers within WAIT_S, and is asked again
        while it runs, so no call of a controller that died holds an actor's thread."""
        actor = self.actor
        actor.wait.remote(WAIT_S).future().add_done_callback(
            lambda fut: self._on_exit(fut, actor))

    def _on_exit(self, fut: concurrent.futures.Future[Any], actor: Any = None) -> None:
        if actor is not None and actor is not self.actor:
            return                      # an actor it had before being placed again
        try:
            code = fut.result()
            if code is None:            # still running
                if not self.done and not self.killed:
                    self.watch()
                return
            self.code = int(code)
        except BaseException as exc:  # noqa: BLE001 - the actor or its node died
            if self.spec is not None and _never_started(self, exc):
                # Pinned to a node that left the cluster (Ray listed it a moment longer),
                # or lost with it before it ran: nothing of the user's failed. Place it
                # again (alive() does) instead of reporting a replica that failed to start.
                log.info("replica %s was lost before it started (%s); placing it again",
                         self.replica_id, type(exc).__name__)
                self.replaced += 1
                self.actor = None
                self.waiting = ("its node left the cluster before it started; placing it "
                                "on another")
                return
            self.code = -9
        self.done = True


# How long one wait() call on an actor lasts before it is asked again.
WAIT_S = 30.0
# How often one replica is placed again because its node went away before it started.
MAX_REPLACEMENTS = 20


def _never_started(proc: RayProcess, exc: BaseException) -> bool:
    """Whether the actor was lost before it reported ready for a reason of the cluster's:
    Ray could not schedule it on the node it was pinned to (the node is gone), or it died
    of a system failure, not an error of its own, while pinned to a node (max_replicas_per
    _node pins each replica to a node that nodes() listed, which may be leaving)."""
    if proc.placed or proc.killed or proc.replaced >= MAX_REPLACEMENTS:
        return False
    from ray import exceptions
    if isinstance(exc, exceptions.ActorUnschedulableError):
        return True
    return bool(proc.node) and isinstance(exc, exceptions.RayActorError) \
        and not exc.actor_init_failed


class RayBackend:
    """Starts replicas and proxies as actors of the Ray cluster this process joined."""

    name = "ray"

    def __init__(self, address: str | None = None,
                 runtime_env: dict[str, Any] | None = None, detached: str = "") -> None:
        # the job's runtime_env (fleet run: the app's directory as working_dir), which
        # Ray merges into every actor's own (ray.init rewrites the dict it is given)
        given = dict(runtime_env or {})
        self.ray, joined = connect(address, dict(given) if runtime_env else None)
        # fleet.start looks for a detached controller first, joining Ray for that
        self.owns_ray = joined or (_joined and not detached)
        self.runtime_env = given if self.owns_ray else {}
        self.listen_host: str = self.ray.util.get_node_ip_address()
        self.procs: dict[str, RayProcess] = {}
        self._nodes: list[dict[str, Any]] = []
        self._nodes_at = 0.0
        self._directory: Any = None     # the named actor publish() made
        # Under a detached controller (ray_actors.ControllerActor), its instance id:
        # replicas and proxies are then detached, named actors that outlive a controller
        # that dies, find it again when it restarts, and are adopted by it.
        self.detached = detached

    def _lasting(self, key: str) -> dict[str, Any]:
        """The actor options that make an actor outlive a detached controller."""
        if not self.detached:
            return {}
        return {"name": self.actor_name(key), "namespace": NAMESPACE, "lifetime": "detached"}

    def actor_name(self, key: str) -> str:
        """The name of the actor of this instance's process key (detached)."""
        return f"fleet-{self.detached}-{key}"

    def adopt(self, key: str, group: str = "") -> RayProcess | None:
        """The live actor of a replica (or proxy) a controller that died had started, as
        this backend tracks it (group: its deployment's key); None when it is gone."""
        try:
            actor = self.ray.get_actor(self.actor_name(key), namespace=NAMESPACE)
        except ValueError:
            return None
        proc = RayProcess(key, group or key, {}, None)
        proc.actor = actor
        proc.actor.ready.remote().future().add_done_callback(proc._on_ready)
        proc.watch()
        self.procs[key] = proc
        return proc

    def survivors(self) -> set[str]:
        """The keys of this instance's named actors alive now (a controller that died
        started them)."""
        return _named_after(self.ray, self.actor_name(""))

    def kill_orphans(self, keys: set[str]) -> list[str]:
        """Kill this instance's named actors with those keys (started by a controller
        that died before it recorded them); their names."""
        killed = []
        for key in sorted(keys):
            name = self.actor_name(key)
            try:
                self.ray.kill(self.ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
                killed.append(name)
            except Exception:  # noqa: BLE001 - it ended meanwhile
                pass
        return killed

    # -- nodes -------------------------------------------------------------------------
    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes, the head node first."""
        now = time.monotonic()
        if now - self._nodes_at > NODES_TTL_S:
            found = []
            for node in self.ray.nodes():
                if not node.get("Alive"):
                    continue
                resources = dict(node.get("Resources") or {})
                found.append({"node_id": node["NodeID"], "address": node["NodeManagerAddress"],
                              "cpus": resources.get("CPU", 0), "resources": resources,
                              "head": "node:__internal_head__" in resources})
            found.sort(key=lambda n: (not n["head"], n["node_id"]))
            self._nodes, self._nodes_at = found, now
        return self._nodes

    # -- replicas ---------------------------------------------------------------------
    async def start_replica(self, spec: ReplicaSpec) -> RayProcess:
        options = dict(spec.config.get("ray_actor_options") or {})
        per_node = spec.config.get("max_replicas_per_node")
        if spec.config.get("is_driver_deployment"):
            per_node = 1
        proc = RayProcess(spec.replica_id, deployment_key(spec.app_name, spec.deployment_name),
                          _demand(options), per_node, spec, options)
        proc.infeasible = lambda: self.infeasible(proc)
        self.procs[spec.replica_id] = proc
        self._place(proc)
        return proc

    def _place(self, proc: RayProcess) -> None:
        """Make the replica's actor: pinned to a node with room when the deployment
        limits its replicas per node, else wherever Ray finds the resources."""
        from fleet._backends import ray_actors
        actor_class: Any = ray_actors.ReplicaActor       # a Ray actor class: untyped
        proc.last_try = time.monotonic()
        options, spec = proc.options, proc.spec
        assert spec is not None
        actor_options: dict[str, Any] = {
            "num_cpus": float(options.get("num_cpus", DEFAULT_NUM_CPUS)),
            "max_concurrency": ACTOR_CONCURRENCY, "max_restarts": 0}
        for key in ("num_gpus", "memory", "resources", "runtime_env"):
            if options.get(key) is not None:
                actor_options[key] = options[key]
        if proc.per_node is not None:
            node = self._node_with_room(proc)
            if node is None:
                proc.waiting = (f"waiting for a node with {_describe(proc.demand)} that runs "
                                f"fewer than max_replicas_per_node={proc.per_node} replicas "
                                "of this deployment")
                return
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            actor_options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
            proc.node = node
            proc.waiting = ""
        working_dir = (options.get("runtime_env") or {}).get("working_dir") \
            or self.runtime_env.get("working_dir")
        if working_dir:
            spec = _from_working_dir(spec, working_dir)
        # Ray's working_dir becomes the actor's cwd; the driver's cwd may not exist there.
        actor_options.update(self._lasting(spec.replica_id))
        proc.actor = actor_class.options(**actor_options).remote(
            spec, not working_dir, bool(self.detached))
        proc.actor.ready.remote().future().add_done_callback(proc._on_ready)
        proc.watch()

    def _node_with_room(self, proc: RayProcess) -> str | None:
        counts: dict[str, int] = {}
        for other in self.procs.values():
            if other.key == proc.key and other.actor is not None and not other.done:
                counts[other.node] = counts.get(other.node, 0) + 1
        assert proc.per_node is not None
        choices = [n for n in self.nodes() if _fits(proc.demand, n["resources"])
                   and counts.get(n["node_id"], 0) < proc.per_node]
        if not choices:
            return None
        return str(min(choices, key=lambda n: counts.get(n["node_id"], 0))["node_id"])

    def infeasible(self, proc: RayProcess) -> bool:
        """Whether no live node has the resources the replica asks for at all."""
        return not any(_fits(proc.demand, n["resources"]) for n in self.nodes())

    async def stop_replica(self, proc: Any, timeout_s: float) -> None:
        assert isinstance(proc, RayProcess)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not proc.done and proc.actor is not None:
            if loop.time() > deadline:
                if proc.killed:
                    break           # Ray took it back; its references may never resolve
                self.kill(proc)
                deadline = loop.time() + 5
            await asyncio.sleep(0.02)
        self.kill(proc)             # the actor outlives its replica's return: free it
        proc.done = True
        if proc.code is None:
            proc.code = -9
        self.procs.pop(proc.replica_id, None)

    def terminate(self, proc: Any) -> None:
        assert isinstance(proc, RayProcess)
        if not proc.placed:
            self.kill(proc)         # nothing runs yet, nothing to drain
        elif not proc.done:
            proc.actor.stop.remote()

    def kill(self, proc: Any) -> None:
        assert isinstance(proc, RayProcess)
        if proc.actor is None:
            proc.done = True
            proc.code = proc.code if proc.code is not None else -9
            return
        if not proc.killed:
            proc.killed = True
            try:
                self.ray.kill(proc.actor, no_restart=True)
            except Exception:
                pass
        # ray.kill ends the actor at once; its references may resolve late or never, and
        # a killed replica must not hold its node's room (max_replicas_per_node)
        proc.done = True
        proc.code = proc.code if proc.code is not None else -9
        self.procs.pop(proc.replica_id, None)

    def alive(self, proc: Any) -> bool:
        assert isinstance(proc, RayProcess)
        if proc.actor is None and not proc.done \
                and time.monotonic() - proc.last_try > NODES_TTL_S:
            self._place(proc)           # a node may have room now
        return proc.alive()

    # -- proxies ------------------------------------------------------------------------
    def spawn(self, key: str, module: str, payload: Any,
              fds: tuple[int, ...] = ()) -> RayProcess:
        """Start a proxy actor on the node payload["node_id"] names."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from fleet._backends import ray_actors
        actor_class: Any = ray_actors.ProxyActor
        if module != "fleet._proxy" or fds:
            raise FleetError(f"the Ray backend starts proxies only (asked for {module!r})")
        node = payload["node_id"]
        proc = RayProcess(key, key, {}, None)
        proc.node = node
        proc.actor = actor_class.options(
            num_cpus=0, max_concurrency=ACTOR_CONCURRENCY, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            **self._lasting(key),
        ).remote(dict(payload, rejoin=bool(self.detached)))
        proc.actor.ready.remote().future().add_done_callback(proc._on_ready)
        proc.watch()
        self.procs[key] = proc
        return proc

    # -- the end ----------------------------------------------------------------------
    async def shutdown(self) -> None:
        self._unpublish()
        for proc in list(self.procs.values()):
            self.terminate(proc)
        await asyncio.gather(*[self.stop_replica(p, 5.0) for p in list(self.procs.values())],
                             return_exceptions=True)
        self.procs.clear()

    def publish(self, info: dict[str, Any]) -> str | None:
        """A named actor (DIRECTORY_NAME in DIRECTORY_NAMESPACE) holding info, so that
        ``fleet status --ray-address ...`` finds the instance from any process that can
        join the cluster. It belongs to this process and ends with it. A cluster holds
        one: when another instance's is there, say so and leave it. A detached controller
        is that named actor itself: nothing to make."""
        if self.detached:
            return None
        from fleet._backends import ray_actors
        actor_class: Any = ray_actors.InstanceDirectory
        try:
            self._directory = actor_class.options(
                name=DIRECTORY_NAME, namespace=DIRECTORY_NAMESPACE, num_cpus=0,
                max_restarts=0).remote(info)
            self.ray.get(self._directory.info.remote(), timeout=30)
        except ValueError:      # the name is taken
            self._directory = None
            return (f"another fleet instance on this Ray cluster holds the name "
                    f"{DIRECTORY_NAME!r}: --ray-address finds that one, not this one")
        except Exception as exc:  # noqa: BLE001 - a cluster that cannot make it
            self._directory = None
            return f"could not publish the instance on the Ray cluster: {exc}"
        return None

    def _unpublish(self) -> None:
        directory, self._directory = self._directory, None
        if directory is not None:
            try:
                self.ray.kill(directory)
            except Exception:  # noqa: BLE001 - Ray is leaving already
                pass

    def kill_all(self) -> None:
        """Last resort at exit: kill every actor; leave Ray if this backend joined it."""
        self._unpublish()
        for proc in list(self.procs.values()):
            self.kill(proc)
        self.procs.clear()
        if self.owns_ray and self.ray.is_initialized():
            leave(self.ray)
