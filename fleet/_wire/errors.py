"""Errors across the wire: a replica's exception to a payload and back to an exception."""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from fleet._types import ErrorInfo
from fleet.exceptions import RemoteTraceback, ReplicaError


def error_info(exc: BaseException, where: str = "", **flags: Any) -> ErrorInfo:
    """Describe exc for the caller; keep the exception itself when it pickles."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if where:
        tb = f"{where}\n{tb}"
    cause, exc.__cause__ = exc.__cause__, None
    context, exc.__context__ = exc.__context__, None
    try:
        data = pickle.dumps(exc, 5)
        pickle.loads(data)      # some exceptions pickle but cannot be rebuilt
        blob: bytes | None = data
    except Exception:
        blob = None
    finally:
        exc.__cause__, exc.__context__ = cause, context
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    if type(exc).__module__ == "builtins":
        name = type(exc).__qualname__
    try:
        message = str(exc)      # user code: if it fails, the caller must still get an answer
    except Exception as str_exc:
        message = f"<str() of the exception failed: {str_exc!r}>"
    return ErrorInfo(blob, name, message, tb, flags)


def rebuild(info: ErrorInfo) -> BaseException:
    """The caller's exception: the original type when possible, else ReplicaError."""
    blob, name, message, tb, _flags = info
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(bytes(blob))
        except Exception:
            exc = None
    if exc is None:
        exc = ReplicaError(f"{name}: {message}", error_type=name, remote_traceback=tb)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    try:
        exc.remote_traceback = tb  # type: ignore[attr-defined]
    except Exception:
        pass
    return exc
