"""gRPC schemas, shared by the proxy and the replica: what a generated
``add_XServicer_to_server`` registers (methods, kinds, (de)serializers), status codes
by number, and the exception that ends an RPC with a status.

The proxy learns the RPCs it routes from here; the replica parses and answers requests
with the same schemas. Neither imports the other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import grpc

CODES = {c.value[0]: c for c in grpc.StatusCode}


class GrpcStatus(Exception):
    """Ends an RPC with this status: ``context.abort`` in a replica, a routing failure
    (no such application) in the proxy."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class MethodSchema:
    """What one RPC needs on either side: its kind and (de)serializers."""

    __slots__ = ("request_streaming", "response_streaming", "deserialize", "serialize")

    def __init__(self, handler: Any) -> None:
        self.request_streaming = bool(handler.request_streaming)
        self.response_streaming = bool(handler.response_streaming)
        self.deserialize: Callable[[bytes], Any] = handler.request_deserializer or _same
        self.serialize: Callable[[Any], bytes] = handler.response_serializer or _same


def _same(value: Any) -> Any:
    return value


class _Capture:
    """A stand-in server that records what a generated ``add_XServicer_to_server`` adds."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler

    def add_generic_rpc_handlers(self, generic: Any) -> None:
        # Older generated code registers only a generic handler; read its table. grpcio
        # keys it by method name in some versions and by full name ("/svc/Method") in
        # others; newer generated code registers both ways, and a full name must not be
        # prefixed again (that made names like "/svc//svc/Method", and "svc//svc" services).
        for g in generic:
            service = getattr(g, "_name", None)
            for name, handler in (getattr(g, "_method_handlers", None) or {}).items():
                full = name if name.startswith("/") else f"/{service}/{name}"
                self.handlers.setdefault(full, handler)


def servicer_handlers(add_fn: Callable[[Any, Any], None]) -> dict[str, Any]:
    """The method handlers (by full method name) a servicer function registers."""
    capture = _Capture()
    add_fn(_NullServicer(), capture)
    return capture.handlers


class _NullServicer:
    def __getattr__(self, name: str) -> Any:
        return None


def load_servicer_function(path: str) -> Callable[[Any, Any], None]:
    """Import ``"pkg.x_pb2_grpc.add_XServicer_to_server"``."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"grpc_servicer_functions: {path!r} is not an import path like "
                         "'pkg.x_pb2_grpc.add_XServicer_to_server'")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"grpc_servicer_functions: {module} has no function {name!r}")
    return fn  # type: ignore[no-any-return]


def class_servicers(cls: type) -> list[tuple[str, Callable[[Any, Any], None]]]:
    """The generated servicer registration functions of the ``XServicer`` bases of cls."""
    found = []
    for base in cls.__mro__:
        try:
            module = importlib.import_module(base.__module__)
        except Exception:
            continue
        fn = getattr(module, f"add_{base.__name__}_to_server", None)
        if callable(fn):
            found.append((base.__module__, fn))
    return found
