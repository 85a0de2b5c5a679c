"""fleet: serve models and Python microservices as replicated deployments.

Mark a class with :func:`deployment`, compose with ``.bind()``, start it with
:func:`run`, and call it over HTTP, gRPC or a :class:`DeploymentHandle`.
"""

from fleet import oip
from fleet._api import (
    delete,
    get_app_handle,
    get_deployment_handle,
    run,
    set_traffic,
    shadow_traffic,
    shutdown,
    start,
    status,
)
from fleet._batching import batch
from fleet._config import (
    AutoscalingConfig,
    DeploymentConfig,
    GRPCOptions,
    HTTPOptions,
)
from fleet._deployment import Application, Deployment, deployment
from fleet._handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from fleet._ingress import ingress
from fleet._multiplex import get_multiplexed_model_id, multiplexed
from fleet._refs import get, wait
from fleet._serve_request import ServeRequest
from fleet.exceptions import (
    BackPressureError,
    DeploymentFailedError,
    FleetError,
    FrameTooLargeError,
    GetTimeoutError,
    MethodNotFoundError,
    ReplicaDiedError,
    ReplicaDrainingError,
    ReplicaError,
    ReplicaFullError,
    RequestCancelledError,
    RequestTimeoutError,
)

__version__ = "0.1.0"

__all__ = [
    "Application",
    "AutoscalingConfig",
    "BackPressureError",
    "Deployment",
    "DeploymentConfig",
    "DeploymentFailedError",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "FleetError",
    "FrameTooLargeError",
    "GRPCOptions",
    "GetTimeoutError",
    "HTTPOptions",
    "MethodNotFoundError",
    "ReplicaDiedError",
    "ReplicaDrainingError",
    "ReplicaError",
    "ReplicaFullError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "ServeRequest",
    "__version__",
    "batch",
    "delete",
    "deployment",
    "get",
    "get_app_handle",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "ingress",
    "multiplexed",
    "oip",
    "run",
    "set_traffic",
    "shadow_traffic",
    "shutdown",
    "start",
    "status",
    "wait",
]
