"""Optional OpenTelemetry spans (``pip install 'fleet[otel]'``).

Spans are made only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set in the environment of the process that
starts the instance (its children inherit it) and ``FLEET_OTEL`` is not ``0``: the HTTP
and gRPC proxies make one per request (``fleet.http``, ``fleet.grpc``), the replica one
per call (``fleet.replica``) and one per batch (``fleet.batch``, linked to its calls'
spans), sent over OTLP/HTTP by the SDK's batch processor. A request's ``traceparent``
is the proxy span's parent; the proxy's span is the replica's, whose span is the parent
of the handle calls it makes. Without the packages or the variable, nothing here is
imported beyond this module and the request paths test one attribute.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("fleet.otel")

_provider: Any = None
_tracer: Any = None
_configured = False


def wanted() -> bool:
    """Whether spans were asked for (an OTLP endpoint is set, FLEET_OTEL is not 0)."""
    if os.environ.get("FLEET_OTEL", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def tracer(role: str) -> Any:
    """This process's tracer (made on the first call, for a process of kind role:
    ``proxy``, ``replica``), or None when spans are off or the packages are missing."""
    global _provider, _tracer, _configured
    if _configured:
        return _tracer
    _configured = True
    if not wanted():
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry's packages are "
                    "not installed: pip install 'fleet[otel]' to send spans")
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "fleet"),
                                "fleet.process": role, "process.pid": os.getpid()})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(),
                                                    schedule_delay_millis=500))
    _tracer = _provider.get_tracer("fleet")
    return _tracer


def current() -> Any:
    """The tracer if this process made one, else None (no set-up)."""
    return _tracer


def parent(traceparent: str | None) -> Any:
    """An OpenTelemetry context whose span is the one a traceparent names (or None)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def traceparent_of(span: Any) -> str:
    """The W3C traceparent naming span (what its children get)."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def link(traceparent: str | None) -> Any:
    """A link to the span a traceparent names, or None."""
    if not traceparent:
        return None
    from opentelemetry import trace
    span_ctx = trace.get_current_span(parent(traceparent)).get_span_context()
    return trace.Link(span_ctx) if span_ctx.is_valid else None


def flush() -> None:
    """Send the spans not sent yet (a process calls it before it exits)."""
    if _provider is not None:
        try:
            _provider.force_flush(2000)
        except Exception:  # noqa: BLE001 - an unreachable collector must not block exit
            pass
