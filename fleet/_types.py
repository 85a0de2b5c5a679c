"""Interface types: the records that cross processes and the seams' Protocols.

Imports nothing of fleet, so every layer can depend on it.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, TypedDict

# -- ASGI, as the HTTP proxy and ingress replicas speak it ------------------------------
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ProcessRole:
    """What this process is, for the little that differs by process: a replica sets
    ``replica`` before it imports the user's code, whose ``@fleet.deployment`` lines then
    keep their options unchecked (the replica's own come checked in its spec), so a
    replica never loads pydantic."""

    replica = False


class ReplicaState(str, enum.Enum):
    """A replica's life: STARTING -> RUNNING -> STOPPING -> (gone); or UNHEALTHY/DEAD."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    STOPPING = "STOPPING"
    DEAD = "DEAD"


class DeploymentStatus(str, enum.Enum):
    """A deployment's state as :func:`fleet.status` reports it."""

    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    DELETING = "DELETING"


class ApplicationStatus(str, enum.Enum):
    """An application's state: the worst of its deployments'."""

    DEPLOYING = "DEPLOYING"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    DELETING = "DELETING"


@dataclass
class ReplicaSpec:
    """Everything a backend needs to start one replica, and the replica to run."""

    replica_id: str
    app_name: str
    deployment_name: str
    version: str
    serialized_def: bytes          # cloudpickle of (callable, init_args, init_kwargs)
    config: dict[str, Any]         # DeploymentConfig.model_dump()
    controller_address: str
    secret: bytes
    sys_path: list[str] = field(default_factory=list)
    cwd: str = ""
    logs_dir: str = ""             # the instance's log directory ("" = no log files)
    # Where the replica listens: "" for a Unix socket beside the controller's; a host
    # (a cluster node's address) for TCP on that host, which other nodes can reach.
    listen_host: str = ""


class _ReplicaAddress(TypedDict):
    replica_id: str
    address: str


class ReplicaInfo(_ReplicaAddress, total=False):
    """A replica as callers see it in the published table."""

    models: list[str]              # multiplexed model ids it holds, when any


class DeploymentTable(TypedDict):
    """What a caller needs to route to one deployment."""

    replicas: list[ReplicaInfo]
    max_ongoing_requests: int
    max_queued_requests: int
    status: str                    # a DeploymentStatus value (plain str on the wire)
    message: str
    legacy_refs: bool
    autoscaling: bool              # callers report their load to the controller


class RouteInfo(TypedDict):
    """A route prefix's target: the app and its ingress deployment."""

    app: str
    ingress: str
    protocol: str                  # "http" or "grpc": the ingress's kind
    grpc_port: int | None          # the port a gRPC driver asked to be served on


class TrafficPolicy(TypedDict):
    """How a route's requests are shared out: ``split`` lists (app, ingress, cumulative
    share up to 1.0) to draw from; ``shadow`` (app, ingress, fraction) each get a copy
    of that fraction of requests, their answers dropped."""

    split: list[tuple[str, str, float]]
    shadow: list[tuple[str, str, float]]


class Tables(TypedDict):
    """The versioned snapshot the controller publishes to every subscriber."""

    version: int
    deployments: dict[str, DeploymentTable]   # key: "app#deployment"
    routes: dict[str, RouteInfo]              # key: route prefix
    traffic: dict[str, TrafficPolicy]         # key: route prefix
    oip: dict[str, Any]                       # Open Inference Protocol models by name


# -- what crosses processes on the data plane ----------------------------------------------

# A call's metadata (the fourth element of a CALL frame), all keys optional:
#   http_headers: headers a handle call carries (handle.options(http_headers=...))
#   model: the multiplexed model id it is for
#   stream: the caller reads a stream (CHUNK frames, then OK)
#   http: an HTTP request from the proxy (args: ((scope, body),)); ws: a websocket
#   grpc: "/pkg.Service/Method" of a gRPC call from the proxy, with
#     md: its invocation metadata; fn: the servicer function path or None;
#     in: "args" (one request message) or "data" (DATA frames, None ending them);
#     out: the reply streams; timeout: seconds left or None; describe: list the RPCs
CallMeta = TypedDict("CallMeta", {
    "http_headers": dict[str, str],
    "model": str,
    "stream": bool,
    "http": int,
    "ws": int,
    "grpc": str,
    "md": tuple[tuple[str, Any], ...],
    "fn": str | None,
    "in": Literal["args", "data"],
    "out": bool,
    "timeout": float | None,
    "describe": int,
    "rid": str | bytes,
    "tp": str,
}, total=False)


class GrpcReply(NamedTuple):
    """A gRPC call's answer from its replica when it is not a plain OK message (that is
    sent as its bytes alone)."""

    message: bytes | None
    code: int                         # grpc.StatusCode's number
    details: str
    trailing: Sequence[tuple[str, Any]]
    initial: Sequence[tuple[str, Any]]


class ErrorInfo(NamedTuple):
    """An exception as an ERR frame carries it (see ``fleet._wire.errors``)."""

    blob: bytes | None                # the pickled exception, when it pickles back
    name: str                         # its qualified class name
    message: str
    traceback: str                    # the remote traceback, as text
    flags: dict[str, Any]             # e.g. user_error: raised by the user's code


# -- control messages (CTRL frames) ---------------------------------------------------------

class TablesMsg(TypedDict):
    """controller -> subscriber: new routing tables."""

    type: Literal["tables"]
    tables: Tables


class TablesAckMsg(TypedDict):
    """subscriber -> controller: it applied this version of the tables."""

    type: Literal["tables_ack"]
    version: int


class LoadMsg(TypedDict):
    """caller -> controller: its calls to one autoscaled deployment."""

    type: Literal["load"]
    key: str
    caller: str
    inflight: int
    queued: int


class HealthMsg(TypedDict):
    """controller -> replica: run the health check."""

    type: Literal["health"]
    id: int
    timeout_s: float


class HealthResultMsg(TypedDict):
    """replica -> controller: the health check's outcome and the replica's load."""

    type: Literal["health_result"]
    id: int | None
    ok: bool
    error: str
    replica_id: str
    ongoing: int
    batches: dict[str, dict[str, Any]]


class StopMsg(TypedDict):
    """controller -> replica: drain (up to timeout_s), then exit."""

    type: Literal["stop"]
    timeout_s: float


class ReconfigureMsg(TypedDict):
    """controller -> replica: call reconfigure(user_config)."""

    type: Literal["reconfigure"]
    user_config: Any


class ReconfigureResultMsg(TypedDict):
    """replica -> controller: how reconfigure went."""

    type: Literal["reconfigure_result"]
    id: int | None
    ok: bool
    error: str
    replica_id: str


class ModelsMsg(TypedDict, total=False):
    """replica -> controller (models: what each loader holds, described) and replica
    -> caller (key, models: the ids it holds or loads)."""

    type: Literal["models"]
    replica_id: str
    key: str
    models: list[Any]


class RequestErrorMsg(TypedDict):
    """proxy -> controller: a request failed in a replica (for the logs)."""

    type: Literal["request_error"]
    app: str
    deployment: str
    request_id: str
    error: str
    traceback: str


class LoggingMsg(TypedDict):
    """controller -> replica: its logging_config changed (applied without a restart)."""

    type: Literal["logging"]
    logging_config: dict[str, Any] | None


class MetricsMsg(TypedDict):
    """any process -> controller, every second: counters and histograms counted since
    the last message (labels as sorted (name, value) pairs), and gauges' values."""

    type: Literal["metrics"]
    source: str
    counters: list[tuple[str, tuple[tuple[str, str], ...], float]]
    hists: list[tuple[str, tuple[tuple[str, str], ...], list[float], tuple[float, ...]]]
    gauges: list[tuple[str, tuple[tuple[str, str], ...], float]]


ControlMessage = (TablesMsg | TablesAckMsg | LoadMsg | HealthMsg | HealthResultMsg | StopMsg
                  | ReconfigureMsg | ReconfigureResultMsg | ModelsMsg | RequestErrorMsg
                  | MetricsMsg | LoggingMsg)


def deployment_key(app: str, deployment: str) -> str:
    """The table key of a deployment."""
    return f"{app}#{deployment}"


class ReplicaProcess(Protocol):
    """A started replica as its backend tracks it."""

    replica_id: str

    @property
    def pid(self) -> int | None:
        """Its process id (this process's own for the memory backend), if it has one."""
        ...

    @property
    def node_id(self) -> str:
        """The node it runs on ("" while not placed yet)."""
        ...

    def alive(self) -> bool: ...

    def exit_code(self) -> int | None:
        """The exit status once it ended (negative: killed by that signal), else None."""
        ...

    def pending(self) -> str | None:
        """Why it does not run yet (waiting for a node with the resources it asks for),
        or None once it was placed."""
        ...


class Backend(Protocol):
    """The seam: the only code that knows how replica processes are made."""

    name: str
    # "" when every process of the instance shares this machine (Unix sockets); else
    # the address of this process's node, where the controller listens on TCP.
    listen_host: str

    async def start_replica(self, spec: ReplicaSpec) -> ReplicaProcess:
        """Start a replica; it reports readiness to the controller itself."""
        ...

    async def stop_replica(self, proc: ReplicaProcess, timeout_s: float) -> None:
        """Make sure the replica is gone: wait up to timeout_s, then kill it."""
        ...

    def terminate(self, proc: ReplicaProcess) -> None:
        """Ask the replica to exit (it drains first); returns at once."""
        ...

    def kill(self, proc: ReplicaProcess) -> None:
        """End the replica now, with no draining; returns at once."""
        ...

    def nodes(self) -> list[dict[str, Any]]:
        """The machines replicas can be placed on."""
        ...

    def alive(self, proc: ReplicaProcess) -> bool:
        """Whether the replica's process still runs."""
        ...

    def spawn(self, key: str, module: str, payload: Any,
              fds: tuple[int, ...] = ()) -> ReplicaProcess:
        """Start another fleet process (a proxy) running ``python -m module`` with
        payload, under key; it inherits the file descriptors fds (a listening socket
        that several proxies share)."""
        ...

    async def shutdown(self) -> None:
        """Stop everything this backend started."""
        ...

    def kill_all(self) -> None:
        """Last resort at interpreter exit, from any thread: end everything now."""
        ...

    def publish(self, info: dict[str, Any]) -> str | None:
        """Make the instance findable where its processes run, beyond this machine's
        instance files (where its management API answers, and its token); None when
        published or when the backend has no such place, else why not."""
        ...


class Adopting(Protocol):
    """A backend whose processes outlive a controller that dies (Ray's, under a detached
    controller): the one that restarts takes them over."""

    def adopt(self, key: str, group: str = "") -> ReplicaProcess | None:
        """The live process a controller that died had started under key (group: its
        deployment's key), now tracked by this backend; None when it is gone."""
        ...

    def survivors(self) -> set[str]:
        """The keys of this instance's processes that are alive now."""
        ...

    def kill_orphans(self, keys: set[str]) -> list[str]:
        """End this instance's processes with those keys; the names of those ended."""
        ...
