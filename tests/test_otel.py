"""The optional OpenTelemetry spans (fleet[otel]) against a real OTLP/HTTP receiver: the
proxy's span is the child of the client's traceparent, each replica call's the child of
its caller's, and a batch's span links the calls it ran."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from apps.observe_apps import Batched, front
from helpers import wait_for

import fleet

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class _Receiver(http.server.BaseHTTPRequestHandler):
    spans: list[dict[str, Any]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        found = []
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    found.append({
                        "name": span.name, "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex(),
                        "attributes": {a.key: a.value for a in span.attributes},
                        "links": [lk.span_id.hex() for lk in span.links]})
        with self.lock:
            self.spans.extend(found)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Receiver.spans = []
    # the instance's processes inherit the driver's environment
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT",
                       f"http://127.0.0.1:{server.server_address[1]}")
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0})
    try:
        yield _Receiver.spans
    finally:
        fleet.shutdown()
        server.shutdown()
        server.server_close()
        thread.join(10)


def _named(spans: list[dict[str, Any]], name: str, **attrs: Any) -> list[dict[str, Any]]:
    with _Receiver.lock:
        return [s for s in spans if s["name"] == name and all(
            getattr(s["attributes"].get(k), "string_value", None) == v
            for k, v in attrs.items())]


def test_spans_follow_the_request_through_proxy_replicas_and_batches(collector):
    fleet.run(front, name="traced", route_prefix="/traced")
    port = fleet.status()["proxies"]["http"]["port"]
    r = httpx.get(f"http://127.0.0.1:{port}/traced",
                  headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert r.status_code == 200
    (proxy,) = wait_for(lambda: _named(collector, "fleet.http"))
    (front_span,) = wait_for(lambda: _named(collector, "fleet.replica",
                                            **{"fleet.deployment": "Front"}))
    (inner,) = wait_for(lambda: _named(collector, "fleet.replica",
                                       **{"fleet.deployment": "Inner"}))
    assert proxy["trace_id"] == front_span["trace_id"] == inner["trace_id"] == TRACE_ID
    assert proxy["parent"] == PARENT_ID
    assert front_span["parent"] == proxy["span_id"]
    assert inner["parent"] == front_span["span_id"]        # through the handle call
    assert proxy["attributes"]["http.response.status_code"].int_value == 200

    handle = fleet.run(Batched.bind(), name="tbatch", route_prefix=None)
    assert [x.result(timeout_s=30) for x in [handle.remote(i) for i in range(4)]] == \
        [0, 2, 4, 6]
    # the spans reach the collector in the exporter's own batches: wait for every batch
    # span (their sizes add up to the 4 calls) and for the calls' spans they link to
    def exported() -> tuple[list, set] | None:
        batches = _named(collector, "fleet.batch")
        calls = {s["span_id"] for s in _named(collector, "fleet.replica",
                                              **{"fleet.deployment": "Batched"})}
        linked = {link for b in batches for link in b["links"]}
        done = sum(b["attributes"]["fleet.batch_size"].int_value for b in batches) >= 4 \
            and linked <= calls
        return (batches, calls) if done else None
    batches, calls = wait_for(exported, what="the batch spans and the call spans they link")
    linked = {link for b in batches for link in b["links"]}
    assert linked and linked <= calls
    assert sum(b["attributes"]["fleet.batch_size"].int_value for b in batches) == 4


def test_without_an_endpoint_nothing_is_traced(monkeypatch):
    from fleet import _otel
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert not _otel.wanted()
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0})
    try:
        fleet.run(front, name="plain", route_prefix="/plain")
        port = fleet.status()["proxies"]["http"]["port"]
        r = httpx.get(f"http://127.0.0.1:{port}/plain",
                      headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        assert r.status_code == 200 and r.json()["front_id"] == r.headers["x-request-id"]
    finally:
        fleet.shutdown()
