"""Interface types: the records that cross processes and the seams' Protocols.

Imports nothing of fleet, so every layer can depend on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict


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
    status: str
    message: str
    legacy_refs: bool
    autoscaling: bool              # callers report their load to the controller


class RouteInfo(TypedDict):
    """A route prefix's target: the app and its ingress deployment."""

    app: str
    ingress: str
    protocol: str                  # "http" or "grpc": the ingress's kind
    grpc_port: int | None          # the port a gRPC driver asked to be served on


class Tables(TypedDict):
    """The versioned snapshot the controller publishes to every subscriber."""

    version: int
    deployments: dict[str, DeploymentTable]   # key: "app#deployment"
    routes: dict[str, RouteInfo]              # key: route prefix
    traffic: dict[str, Any]
    oip: dict[str, Any]                       # Open Inference Protocol models by name


def deployment_key(app: str, deployment: str) -> str:
    """The table key of a deployment."""
    return f"{app}#{deployment}"


class ReplicaProcess(Protocol):
    """A started replica as its backend tracks it."""

    replica_id: str

    def alive(self) -> bool: ...

    def exit_code(self) -> int | None:
        """The exit status once it ended (negative: killed by that signal), else None."""
        ...


class Backend(Protocol):
    """The seam: the only code that knows how replica processes are made."""

    name: str

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
