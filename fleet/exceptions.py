"""fleet's exceptions.

The tree::

    FleetError                      base of everything fleet raises itself
    +-- DeploymentFailedError       a deployment could not start (constructor raised, bad spec)
    +-- ReplicaError                a user exception that could not be sent back as itself
    +-- ReplicaDiedError            the replica running a call died before answering
    +-- ReplicaDrainingError        the replica was shutting down and did not start the call
    |   +-- ReplicaFullError        the replica had max_ongoing_requests calls already
    +-- BackPressureError           the deployment's queue is full; retry later
    +-- RequestTimeoutError         the call ran past its timeout and was cancelled
    +-- MethodNotFoundError         the deployment has no such method (also an AttributeError)
    +-- RequestCancelledError       the caller cancelled the call (``response.cancel()``)
    +-- GetTimeoutError             fleet.get() ran past its timeout (also a TimeoutError)
    +-- FrameTooLargeError          an argument or result pickles past one message's limit
                                    (also a ValueError); only its own call fails
    +-- UnsafeRuntimeDirError       fleet's runtime directory is not private to this user

A user exception raised inside a replica reaches a Python caller (a handle) as an
exception of the same type when it can be pickled, with the remote traceback attached
as its ``__cause__`` (a :class:`RemoteTraceback`). This module imports nothing of fleet.

What HTTP and gRPC clients get instead is :data:`ERROR_TABLE`, the one mapping both
proxies use: a status, a gRPC code and a short message that holds no user text, plus
the request's id (the ``X-Request-ID`` header, the ``x-request-id`` trailing metadata).
The exception itself, its message and traceback go to the proxy's log under that id.

=====================  ====  ==================  =========================================
exception              HTTP  gRPC                message
=====================  ====  ==================  =========================================
BackPressureError      503   RESOURCE_EXHAUSTED  the deployment's queue is full; retry later
ReplicaDrainingError   503   UNAVAILABLE         the replica was shutting down; retry
ReplicaFullError       503   UNAVAILABLE         the replica was full; retry
ReplicaDiedError       503   UNAVAILABLE         the replica serving the request died
DeploymentFailedError  503   UNAVAILABLE         the deployment failed to start
RequestTimeoutError    504   DEADLINE_EXCEEDED   the request timed out and was cancelled
RequestCancelledError  499   CANCELLED           the request was cancelled
MethodNotFoundError    404   UNIMPLEMENTED       no such method
ReplicaError           500   INTERNAL            internal error
FrameTooLargeError     500   INTERNAL            internal error
UnsafeRuntimeDirError  500   INTERNAL            internal error
other FleetError       503   UNAVAILABLE         the deployment cannot serve requests now
any other exception    500   INTERNAL            internal error
=====================  ====  ==================  =========================================

A user's exception of one of these types (say a BackPressureError from a handle call
inside a method) gets the same row. Answers the user's code chose (a gRPC
``context.abort``, an ``HTTPException``, a returned Response) are not errors here and
pass as they are.
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


class ReplicaDrainingError(FleetError):
    """The replica was shutting down and refused the call before starting it; a
    caller's router sends such a call to another replica by itself."""


class ReplicaFullError(ReplicaDrainingError):
    """The replica already ran ``max_ongoing_requests`` calls (from several callers, such
    as several proxies) and refused the call before starting it; a caller's router waits
    a moment and sends it again, to this replica or another."""


class BackPressureError(FleetError):
    """The deployment already holds ``max_queued_requests`` waiting calls."""


class RequestTimeoutError(FleetError, TimeoutError):
    """The call did not finish within its timeout; the replica's call was cancelled."""


class MethodNotFoundError(FleetError, AttributeError):
    """The deployment has no method of that name."""


class RequestCancelledError(FleetError):
    """The call was cancelled by its caller: ``response.cancel()`` was called, and
    awaiting the response (in a driver or inside a replica), ``response.result()`` or
    ``fleet.get`` of it raises this."""


class FrameTooLargeError(FleetError, ValueError):
    """A value pickles to more than one message between fleet processes holds (2 GiB):
    the call it belongs to fails, the connection and its other calls go on."""


class UnsafeRuntimeDirError(FleetError):
    """fleet's runtime directory is a symbolic link, another user's, or open to group or
    others; fleet will not keep an instance's secret there or trust what it finds."""


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


# exception class -> (HTTP status, gRPC status code name, message for clients)
ERROR_TABLE: dict[type[BaseException], tuple[int, str, str]] = {
    BackPressureError: (503, "RESOURCE_EXHAUSTED",
                        "the deployment's queue is full; retry later"),
    ReplicaFullError: (503, "UNAVAILABLE", "the replica was full; retry"),
    ReplicaDrainingError: (503, "UNAVAILABLE", "the replica was shutting down; retry"),
    ReplicaDiedError: (503, "UNAVAILABLE", "the replica serving the request died"),
    DeploymentFailedError: (503, "UNAVAILABLE", "the deployment failed to start"),
    RequestTimeoutError: (504, "DEADLINE_EXCEEDED",
                          "the request timed out and was cancelled"),
    RequestCancelledError: (499, "CANCELLED", "the request was cancelled"),
    GetTimeoutError: (504, "DEADLINE_EXCEEDED", "the request timed out"),
    MethodNotFoundError: (404, "UNIMPLEMENTED", "no such method"),
    ReplicaError: (500, "INTERNAL", "internal error"),      # a user exception, by name
    FrameTooLargeError: (500, "INTERNAL", "internal error"),
    UnsafeRuntimeDirError: (500, "INTERNAL", "internal error"),
    FleetError: (503, "UNAVAILABLE", "the deployment cannot serve requests now"),
}
INTERNAL_ERROR: tuple[int, str, str] = (500, "INTERNAL", "internal error")


def client_error(exc: BaseException) -> tuple[int, str, str]:
    """exc's row of :data:`ERROR_TABLE`: (HTTP status, gRPC code name, message)."""
    table = ERROR_TABLE
    for klass in type(exc).__mro__:
        row = table.get(klass)
        if row is not None:
            return row
    return INTERNAL_ERROR


__all__ = [
    "ERROR_TABLE", "BackPressureError", "DeploymentFailedError", "FleetError",
    "FrameTooLargeError", "GetTimeoutError", "MethodNotFoundError", "RemoteTraceback",
    "ReplicaDiedError", "ReplicaDrainingError", "ReplicaError", "ReplicaFullError",
    "RequestCancelledError", "RequestTimeoutError", "UnsafeRuntimeDirError", "client_error",
]
