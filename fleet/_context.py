"""The request being served: its id, readable in user code as ``fleet.get_request_id()``.

The HTTP and gRPC proxies give every request an id (the client's ``X-Request-ID`` when
it sends a valid one) and send it with the call (``CallMeta["rid"]``); the replica sets
it in the call's context, and handle calls made from there carry it on, so one
request's log lines can be followed across deployments.
"""

from __future__ import annotations

import contextvars
import os
import re

_request_id: contextvars.ContextVar[str | bytes | None] = contextvars.ContextVar(
    "fleet_request_id", default=None)
# The W3C traceparent the request came with (HTTP header or gRPC metadata), carried
# through handle calls like the id.
_traceparent: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fleet_traceparent", default=None)
# version 00 as the W3C Trace Context recommendation defines it; all-zero ids are invalid
valid_traceparent = re.compile(
    r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}").fullmatch

_prefix = os.urandom(6).hex()
_count = 0


def set_request_id(rid: str | bytes | None) -> None:
    """The id of the request this task serves (the replica sets it per call)."""
    _request_id.set(rid)


def set_traceparent(value: str | None) -> None:
    _traceparent.set(value)


def current_traceparent() -> str | None:
    return _traceparent.get()


def trace_id() -> str:
    """The trace id of the request being served ("" without a traceparent)."""
    tp = _traceparent.get()
    return tp[3:35] if tp else ""


def current_request_id() -> str | bytes | None:
    """The id as it travels (bytes from an HTTP proxy), or None outside a request."""
    return _request_id.get()


def get_request_id() -> str:
    """The id of the request being served, as the client sees it in ``X-Request-ID``.

    Inside a replica, call it from the request's own code. Calls through a handle
    carry the id of the request they were made for; a call that came with none (a
    handle call from a driver script) gets a new id here, kept for the rest of the
    call, so its log lines still share one.

    Example::

        @fleet.deployment
        class Echo:
            async def __call__(self, request):
                logging.getLogger("app").info("serving")   # the line carries the id
                return {"request_id": fleet.get_request_id()}
    """
    global _count
    rid = _request_id.get()
    if rid is None:
        _count += 1
        rid = f"{_prefix}{_count:020x}"
        _request_id.set(rid)
    return rid.decode() if isinstance(rid, bytes) else rid
