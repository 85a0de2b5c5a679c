"""fleet's exceptions.

The tree::

    FleetError                      base of everything fleet raises itself
    +-- DeploymentFailedError       a deployment could not start (constructor raised, bad spec)
    +-- ReplicaError                a user exception that could not be sent back as itself
    +-- ReplicaDiedError            the replica running a call died before answering
    +-- BackPressureError           the deployment's queue is full; retry later
    +-- RequestTimeoutError         the call ran past its timeout and was cancelled
    +-- MethodNotFoundError         the deployment has no such method (also an AttributeError)
    +-- RequestCancelledError       the caller cancelled the call
    +-- GetTimeoutError             fleet.get() ran past its timeout (also a TimeoutError)

A user exception raised inside a replica reaches the caller as an exception of the
same type when it can be pickled, with the remote traceback attached as its
``__cause__`` (a :class:`RemoteTraceback`). This module imports nothing of fleet.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base class of the errors fleet raises itself."""


class DeploymentFailedError(FleetError):
    """A deployment failed to start; the message holds the replica's error and traceback."""

    def __init__(self, message: str, *, app: str = "", deployment: str = "",
                 error_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.app = app
        self.deployment = deployment
        self.error_type = error_type
        self.remote_traceback = remote_traceback

    def __reduce__(self):  # keep keyword fields across pickling
        return (_rebuild_deploy_failed, (str(self), self.app, self.deployment,
                                         self.error_type, self.remote_traceback))


def _rebuild_deploy_failed(msg: str, app: str, dep: str, etype: str, tb: str
                           ) -> DeploymentFailedError:
    return DeploymentFailedError(msg, app=app, deployment=dep, error_type=etype,
                                 remote_traceback=tb)


class ReplicaError(FleetError):
    """A user exception that could not be pickled, described by type name and message."""

    def __init__(self, message: str, error_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return (ReplicaError, (str(self), self.error_type, self.remote_traceback))


class ReplicaDiedError(FleetError):
    """The replica serving the call died (crashed, killed or lost) before it answered."""


class BackPressureError(FleetError):
    """The deployment already holds ``max_queued_requests`` waiting calls."""


class RequestTimeoutError(FleetError, TimeoutError):
    """The call did not finish within its timeout; the replica's call was cancelled."""


class MethodNotFoundError(FleetError, AttributeError):
    """The deployment has no method of that name."""


class RequestCancelledError(FleetError):
    """The call was cancelled by its caller."""


class GetTimeoutError(FleetError, TimeoutError):
    """:func:`fleet.get` gave up waiting for a result after its ``timeout``; the calls
    go on running (wait for them again, or cancel them)."""


class RemoteTraceback(Exception):
    """Carries a replica's formatted traceback; attached as ``__cause__`` of remote errors."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\nTraceback in the replica:\n" + self.tb


__all__ = [
    "BackPressureError", "DeploymentFailedError", "FleetError", "GetTimeoutError",
    "MethodNotFoundError",
    "RemoteTraceback", "ReplicaDiedError", "ReplicaError", "RequestCancelledError",
    "RequestTimeoutError",
]
