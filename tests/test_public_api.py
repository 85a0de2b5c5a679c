"""The public surface: names exported by fleet, each documented."""

from __future__ import annotations

import inspect

import fleet

EXPECTED = {
    "Application", "AutoscalingConfig", "BackPressureError", "Deployment", "DeploymentConfig",
    "DeploymentFailedError", "DeploymentHandle", "DeploymentResponse",
    "DeploymentResponseGenerator", "FleetError", "FrameTooLargeError", "GRPCOptions",
    "GetTimeoutError", "HTTPOptions", "ManagementOptions",
    "MethodNotFoundError", "ReplicaDiedError", "ReplicaDrainingError", "ReplicaError",
    "ReplicaFullError", "RequestCancelledError", "RequestTimeoutError", "__version__",
    "delete", "deployment",
    "get_app_handle", "get", "get_deployment_handle", "run", "shutdown", "start", "status",
    "wait", "multiplexed", "get_multiplexed_model_id", "oip", "get_request_id",
}


def test_all_holds_the_core_names():
    assert EXPECTED <= set(fleet.__all__)
    assert sorted(fleet.__all__) == list(fleet.__all__)


def test_every_public_name_exists_and_has_a_docstring():
    for name in fleet.__all__:
        obj = getattr(fleet, name)
        if name == "__version__":
            continue
        assert inspect.getdoc(obj), f"fleet.{name} has no docstring"


def test_exception_tree():
    for name in ("BackPressureError", "DeploymentFailedError", "FrameTooLargeError",
                 "MethodNotFoundError",
                 "ReplicaDiedError", "ReplicaDrainingError", "ReplicaError",
                 "RequestCancelledError",
                 "RequestTimeoutError"):
        assert issubclass(getattr(fleet, name), fleet.FleetError)
    assert issubclass(fleet.RequestTimeoutError, TimeoutError)
    assert issubclass(fleet.GetTimeoutError, fleet.FleetError)
    assert issubclass(fleet.GetTimeoutError, TimeoutError)
    assert issubclass(fleet.MethodNotFoundError, AttributeError)
    assert issubclass(fleet.ReplicaFullError, fleet.ReplicaDrainingError)
