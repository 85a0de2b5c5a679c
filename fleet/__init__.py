"""fleet: serve models and Python microservices as replicated deployments.

Mark a class with :func:`deployment`, compose with ``.bind()``, start it with
:func:`run`, and call it over HTTP, gRPC or a :class:`DeploymentHandle`.
"""

import importlib
from typing import TYPE_CHECKING, Any

from fleet._version import __version__
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

if TYPE_CHECKING:
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
        ManagementOptions,
    )
    from fleet._context import get_request_id
    from fleet._deployment import Application, Deployment, deployment
    from fleet._handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
    from fleet._ingress import ingress
    from fleet._multiplex import get_multiplexed_model_id, multiplexed
    from fleet._refs import get, wait
    from fleet._serve_request import ServeRequest

# Public names and the module each lives in, imported on first use: a replica or proxy
# process imports the package for its own modules and needs none of the driver's
# (the controller, the instance, the CLI's helpers).
_LAZY = {
    "get_request_id": "fleet._context",
    "Application": "fleet._deployment",
    "AutoscalingConfig": "fleet._config",
    "Deployment": "fleet._deployment",
    "DeploymentConfig": "fleet._config",
    "DeploymentHandle": "fleet._handle",
    "DeploymentResponse": "fleet._handle",
    "DeploymentResponseGenerator": "fleet._handle",
    "GRPCOptions": "fleet._config",
    "HTTPOptions": "fleet._config",
    "ManagementOptions": "fleet._config",
    "ServeRequest": "fleet._serve_request",
    "batch": "fleet._batching",
    "delete": "fleet._api",
    "deployment": "fleet._deployment",
    "get": "fleet._refs",
    "get_app_handle": "fleet._api",
    "get_deployment_handle": "fleet._api",
    "get_multiplexed_model_id": "fleet._multiplex",
    "ingress": "fleet._ingress",
    "multiplexed": "fleet._multiplex",
    "oip": "fleet.oip",
    "run": "fleet._api",
    "set_traffic": "fleet._api",
    "shadow_traffic": "fleet._api",
    "shutdown": "fleet._api",
    "start": "fleet._api",
    "status": "fleet._api",
    "wait": "fleet._refs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        # a submodule read as an attribute (fleet.exceptions, fleet._api) imports it
        try:
            return importlib.import_module(f"fleet.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fleet.{name}":
                raise
        raise AttributeError(f"module 'fleet' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module == f"fleet.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
    "ManagementOptions",
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
    "get_request_id",
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
