"""The controller's records: applications, deployments and replicas."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fleet._plan import DeploymentPlan
from fleet._types import DeploymentStatus, ReplicaProcess, ReplicaState

if TYPE_CHECKING:
    from fleet._wire.listener import ServerConnection


@dataclass
class ReplicaRecord:
    """One replica as the controller tracks it."""

    replica_id: str
    version: str
    state: ReplicaState = ReplicaState.STARTING
    proc: ReplicaProcess | None = None
    conn: ServerConnection | None = None
    address: str = ""
    pid: int | None = None
    message: str = ""
    started_at: float = field(default_factory=time.monotonic)
    pending_until: float = 0.0     # last seen waiting for its backend to place it
    health_sent: float | None = None
    health_id: int = 0
    last_health: float = field(default_factory=time.monotonic)
    ongoing: int = 0
    batches: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)   # multiplexed, held
    user_config: Any = None        # the user_config this replica was given last
    reconfiguring: bool = False    # a reconfigure was sent and not yet answered
    stopping: bool = False         # being drained (state STOPPING, or UNHEALTHY)
    # adopted by a restarted controller (monotonic deadline to reconnect by), else 0
    rejoin_by: float = 0.0

    @property
    def live(self) -> bool:
        return self.state in (ReplicaState.STARTING, ReplicaState.RUNNING)


@dataclass
class DeploymentState:
    """A deployment's desired plan and its replicas."""

    app: str
    plan: DeploymentPlan
    target: int
    replicas: dict[str, ReplicaRecord] = field(default_factory=dict)
    status: DeploymentStatus = DeploymentStatus.UPDATING
    message: str = ""
    start_failures: int = 0
    error_type: str = ""           # of the constructor that failed the deployment
    traceback: str = ""            # its traceback, shown once by whoever deployed
    same_failures: int = 0         # replicas whose constructor failed the same way
    deleting: bool = False
    scaling_log: list[dict[str, Any]] = field(default_factory=list)
    autoscaler: Any = None
    last_error: dict[str, Any] | None = None     # the last request error a proxy reported
    last_deployed_at: float = field(default_factory=time.time)   # plan last changed
    last_gone: str = ""            # the last replica that exited unasked, and why
    # the last health check failure: (monotonic time, what failed)
    last_unhealthy: tuple[float, str] | None = None
    # replicas replaced or restarted, and why (newest last, bounded)
    replaced: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))
    replaced_total: int = 0

    def record_replaced(self, replica_id: str, reason: str) -> None:
        self.replaced.append({"replica_id": replica_id, "reason": reason, "time": time.time()})
        self.replaced_total += 1

    @property
    def name(self) -> str:
        return self.plan.name

    def live(self, version: str | None = None) -> list[ReplicaRecord]:
        return [r for r in self.replicas.values()
                if r.live and (version is None or r.version == version)]

    def running(self) -> list[ReplicaRecord]:
        return [r for r in self.replicas.values() if r.state == ReplicaState.RUNNING]


@dataclass
class AppState:
    """An application: its route and its deployments, ingress first."""

    name: str
    route_prefix: str | None
    ingress: str
    deployments: dict[str, DeploymentState] = field(default_factory=dict)
    deleting: bool = False
    protocol: str = "http"
    grpc_port: int | None = None       # the port a gRPC driver asked to be served on
    sys_path: list[str] = field(default_factory=list)   # the deployer's import path
    cwd: str = ""                                       # and working directory
    deployed_at: float = field(default_factory=time.time)
    revision: int = 0                  # bumped by every deploy that changes something
    deploy_key: Any = None             # what the current revision deployed (see controller)
