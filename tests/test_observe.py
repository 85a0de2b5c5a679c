"""Metrics, status fields, log files, request ids, readiness and `fleet top`/`fleet logs`
against a real instance: real replica and proxy processes, real HTTP, the CLI as a
subprocess, and the management server's observation routes served by uvicorn on the
instance's own loop over its controller."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from apps.observe_apps import Batched, Broken, front
from helpers import wait_for
from starlette.applications import Starlette

import fleet
from fleet import _api
from fleet._manage.observe import routes
from fleet.exceptions import DeploymentFailedError


def _controller() -> Any:
    inst = _api._instance
    assert isinstance(inst, _api.Instance) and inst.controller is not None
    return inst.controller


def _counter(name: str, **labels: str) -> float:
    """A counter's value in the controller's store, summed over series with labels."""
    store = _controller().metrics
    total = 0.0
    for (n, lb), v in list(store.counters.items()):
        have = dict(lb)
        if n == name and all(have.get(k) == v2 for k, v2 in labels.items()):
            total += v
    return total


@pytest.fixture
def served(instance: Any) -> Iterator[tuple[str, str]]:
    """The front app deployed; (its URL, the observation routes' base URL)."""
    fleet.run(front, name="obs", route_prefix="/obs")
    inst = _api._instance
    assert isinstance(inst, _api.Instance)
    app = Starlette(routes=routes(_controller()))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    done = asyncio.run_coroutine_threadsafe(server.serve(), inst.loop)
    wait_for(lambda: server.started or done.done())
    assert server.started, done.exception()
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"{instance.http_url}/obs", f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        done.result(15)


def test_request_id_reaches_user_code_and_handle_calls(served):
    url, _ = served
    r = httpx.get(url)
    assert r.status_code == 200
    body = r.json()
    assert body["front_id"] == r.headers["x-request-id"] == body["inner_id"]
    # a client's own id is kept end to end
    r = httpx.get(url, headers={"x-request-id": "my-id-42"})
    assert r.json() == {"front_id": "my-id-42", "inner_id": "my-id-42"}


def test_metrics_reach_the_controller_and_the_routes(served):
    url, base = served
    with httpx.Client() as client:
        for _ in range(7):
            assert client.get(url).status_code == 200
        assert client.get(url, params={"fail": "1"}).status_code == 500
    wait_for(lambda: _counter("fleet_http_requests_total", application="obs",
                              status_code="200") == 7
             and _counter("fleet_replica_errors_total", deployment="Front") == 1
             and _counter("fleet_handle_requests_total", deployment="Inner") == 7
             and _counter("fleet_replica_requests_total", deployment="Inner") == 7)
    # every process sends its figures once a second: wait until all of them arrived
    def scraped() -> str | None:
        text = httpx.get(f"{base}/metrics").text
        running = 'fleet_replicas{application="obs",deployment="Front",state="RUNNING"} 1'
        return text if running in text else None
    text = wait_for(scraped)
    assert ('fleet_http_requests_total{application="obs",method="GET",route="/obs",'
            'status_code="200"} 7') in text
    assert ('fleet_http_requests_total{application="obs",method="GET",route="/obs",'
            'status_code="500"} 1') in text
    assert "# TYPE fleet_http_request_duration_seconds histogram" in text
    assert 'fleet_replica_processing_seconds_count{application="obs",deployment="Inner"' \
        in text
    assert 'fleet_replicas{application="obs",deployment="Front",state="RUNNING"} 1' in text
    assert 'fleet_replica_starts_total{application="obs",deployment="Inner"} 1' in text
    names = httpx.get(f"{base}/api/metrics").json()["metrics"]
    assert {"fleet_http_requests_total", "fleet_replica_queue_seconds",
            "fleet_ongoing_requests", "fleet_autoscaling_target_replicas"} <= set(names)
    # history: the counter's series reaches 8 requests (7 + 1) once sampled
    def sampled() -> Any:
        got = httpx.get(f"{base}/api/metrics/series", params={
            "name": "fleet_http_requests_total", "application": "obs", "window": 60}).json()
        total = sum(s["points"][-1][1] for s in got["series"] if s["points"])
        return got if total == 8 else None
    got = wait_for(sampled)
    assert got["resolution_s"] == 1.0
    assert {s["labels"]["status_code"] for s in got["series"]} == {"200", "500"}
    rates = httpx.get(f"{base}/api/metrics/series", params={
        "name": "fleet_http_requests_total", "rate": "1", "window": 60}).json()
    assert all(p[1] >= 0 for s in rates["series"] for p in s["points"])
    def quantiles() -> Any:
        got = httpx.get(f"{base}/api/metrics/series", params={
            "name": "fleet_replica_processing_seconds", "quantile": "0.99",
            "deployment": "Inner"}).json()
        return got if got["series"] and got["series"][0]["points"] else None
    q = wait_for(quantiles)
    assert q["quantile"] == 0.99
    assert all(0 < p[1] < 60 for p in q["series"][0]["points"])
    # top: one row per deployment
    def front() -> Any:
        rows = httpx.get(f"{base}/api/top").json()["rows"]
        row = next(r for r in rows if r["deployment"] == "Front")
        return row if row["error_rate"] > 0 else None      # its figures were sampled
    front_row = wait_for(front)
    assert front_row["application"] == "obs" and front_row["running_replicas"] == 1
    assert front_row["target_replicas"] == 1 and front_row["requests_per_s"] > 0
    assert front_row["error_rate"] > 0 and front_row["p50_s"] is not None


@pytest.mark.parametrize("query, loc", [
    ({}, "name"),
    ({"name": "fleet_http_requests_total", "window": "soon"}, "window"),
    ({"name": "fleet_http_requests_total", "window": "0"}, "window"),
    ({"name": "fleet_http_requests_total", "rate": "maybe"}, "rate"),
    ({"name": "fleet_replica_processing_seconds", "quantile": "2"}, "quantile"),
])
def test_bad_series_queries_get_422_naming_the_parameter(served, query, loc):
    _, base = served
    r = httpx.get(f"{base}/api/metrics/series", params=query)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", loc]
    assert loc in r.json()["error"]


def test_bad_log_and_top_queries_get_422(served):
    _, base = served
    r = httpx.get(f"{base}/api/logs", params={"since": "yesterday"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "since"]
    r = httpx.get(f"{base}/api/logs", params={"limit": "-1"})
    assert r.status_code == 422
    r = httpx.get(f"{base}/api/top", params={"window": "x"})
    assert r.status_code == 422


def test_log_files_hold_every_replica_line_with_its_request_id(served):
    url, base = served
    r = httpx.get(url)
    rid = r.headers["x-request-id"]

    expected = {("Front", "front serving /obs"),
                ("Front", "front printed a line"),          # stdout, captured
                ("Inner", "inner sees /obs")}               # across the handle call

    def lines() -> Any:
        # each replica writes its own file: wait for every line named, not for a count
        got = httpx.get(f"{base}/api/logs", params={"request_id": rid}).json()["lines"]
        return got if expected <= {(ln["deployment"], ln["message"]) for ln in got} \
            else None
    got = wait_for(lines, what=f"the replicas' lines of request {rid}")
    assert all(ln["application"] == "obs" and ln["request_id"] == rid for ln in got)
    assert all(ln["replica"] for ln in got)
    # the proxies' lines are the system's (the access log names the request); the
    # proxy writes its file on its own schedule, not before the replicas' lines
    def access_line() -> bool:
        system = httpx.get(f"{base}/api/logs", params={"system": "1", "grep": rid}).json()
        return any("GET /obs 200" in ln["message"] for ln in system["lines"])
    wait_for(access_line, what=f"the proxy's access log line of request {rid}")
    only_inner = httpx.get(f"{base}/api/logs", params={"deployment": "Inner",
                                                       "since": "10m"}).json()["lines"]
    assert only_inner and {ln["deployment"] for ln in only_inner} == {"Inner"}


def test_log_stream_sends_new_lines(served):
    url, base = served
    with httpx.Client(timeout=30) as client, client.stream(
            "GET", f"{base}/api/logs/stream", params={"deployment": "Front"}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        rid = client.get(url).headers["x-request-id"]
        deadline = time.monotonic() + 20
        for raw in stream.iter_lines():     # a keep-alive comment comes every 0.5 s
            if raw.startswith("data: ") and json.loads(raw[6:])["request_id"] == rid:
                break
            assert time.monotonic() < deadline, "the request's line never came"


def test_status_fields(served):
    url, _ = served
    httpx.get(url)
    st = fleet.status()["applications"]["obs"]
    for key in ("target_replicas", "desired_replicas", "running_replicas",
                "last_deployed_time_s", "reason", "requests_per_s", "p50_s", "p99_s",
                "error_rate"):
        assert key in st, key
    assert st["running_replicas"] == st["target_replicas"] == 2
    assert st["reason"] == ""
    dep = st["deployments"]["Front"]
    assert dep["target_replicas"] == dep["desired_replicas"] == dep["running_replicas"] == 1
    assert dep["last_deployed_time_s"] > 1e9 and dep["reason"] == ""
    rep = dep["replicas"][0]
    assert {"replica_id", "state", "pid", "node_id", "message"} <= set(rep)
    assert rep["node_id"] == "local" and rep["state"] == "RUNNING" and rep["message"] == ""


def test_failed_constructor_reason_clears_after_a_good_deploy(instance):
    with pytest.raises(DeploymentFailedError):
        fleet.run(Broken.bind(True), name="broken", route_prefix="/broken")
    st = fleet.status()["applications"]["broken"]
    reason = st["deployments"]["Broken"]["reason"]
    assert reason.startswith("constructor failed:")
    assert "RuntimeError: this constructor was told to fail" in reason
    assert "Traceback" in reason or "raise RuntimeError" in reason     # its last lines
    assert st["reason"].startswith("Broken: constructor failed")
    ready = httpx.get(f"{instance.http_url}/-/readyz")
    assert ready.status_code == 503 and "broken" in ready.json()["waiting"]
    fleet.run(Broken.bind(False), name="broken", route_prefix="/broken")
    st = fleet.status()["applications"]["broken"]
    assert st["reason"] == "" and st["deployments"]["Broken"]["message"] == ""
    assert httpx.get(f"{instance.http_url}/-/readyz").json() == {"ready": True}


def test_livez_and_readyz(instance):
    base = instance.http_url
    assert httpx.get(f"{base}/-/livez").status_code == 200
    # no application yet: not ready
    r = httpx.get(f"{base}/-/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False
    fleet.run(front, name="obs", route_prefix="/")
    assert httpx.get(f"{base}/-/readyz").status_code == 200
    # under /-/, never shadowed by an application at /
    assert httpx.get(f"{base}/-/livez").text == "alive"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    # the CLI finds this process's instance where this process recorded it
    env = dict(os.environ, TMPDIR=tempfile.gettempdir())
    return subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_cli_top_logs_and_metrics(instance):
    fleet.run(front, name="obs", route_prefix="/obs")
    rid = httpx.get(f"{instance.http_url}/obs").headers["x-request-id"]
    wait_for(lambda: _counter("fleet_replica_requests_total", deployment="Front") == 1)
    out = _cli("top", "--once")
    assert out.returncode == 0, out.stderr
    head, *rows = out.stdout.splitlines()[1:]
    assert head.split()[:4] == ["APPLICATION", "DEPLOYMENT", "STATUS", "REQ/S"]
    assert any(r.split()[:3] == ["obs", "Front", "HEALTHY"] for r in rows)
    wait_for(lambda: len(_cli("logs", "obs", "--request-id", rid).stdout.splitlines()) >= 3)
    out = _cli("logs", "obs/Inner", "--request-id", rid)
    assert out.returncode == 0 and "inner sees /obs" in out.stdout and "Front" not in out.stdout
    # the proxy's access log line is written by its own process: wait for it
    wait_for(lambda: "GET /obs 200" in _cli("logs", "--system", "--grep", rid).stdout,
             what=f"the proxy's access log line of request {rid}")
    out = _cli("logs", "--since", "soon")
    assert out.returncode != 0 and "--since" in out.stderr and len(out.stderr.splitlines()) == 1
    out = _cli("logs", "a/b/c/d")
    assert out.returncode != 0 and "TARGET" in out.stderr
    out = _cli("metrics")
    assert out.returncode == 0 and "# TYPE fleet_replica_processing_seconds histogram" \
        in out.stdout


def _hist_cells(name: str, **labels: str) -> list[float]:
    store = _controller().metrics
    out: list[float] = []
    for (n, lb), cells in list(store.hists.items()):
        have = dict(lb)
        if n == name and all(have.get(k) == v for k, v in labels.items()):
            out = [a + b for a, b in zip(out or [0.0] * len(cells), cells, strict=True)]
    return out


def test_batch_metrics(instance):
    handle = fleet.run(Batched.bind(), name="batched", route_prefix=None)
    responses = [handle.remote(i) for i in range(8)]
    assert [r.result(timeout_s=30) for r in responses] == [i * 2 for i in range(8)]

    def sizes() -> Any:
        cells = _hist_cells("fleet_batch_size", application="batched")
        return cells if cells and cells[-1] == 8 else None     # the sum: 8 calls
    cells = wait_for(sizes)
    batches = sum(cells[:-1])
    assert 2 <= batches <= 8
    waits = wait_for(lambda: _hist_cells("fleet_batch_wait_seconds", application="batched"))
    assert sum(waits[:-1]) == batches


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_traceparent_is_carried_through_handle_calls(served):
    url, base = served
    r = httpx.get(url, headers={"traceparent": TRACEPARENT})
    rid = r.headers["x-request-id"]

    def lines() -> Any:
        got = httpx.get(f"{base}/api/logs", params={"request_id": rid}).json()["lines"]
        return got if {ln["deployment"] for ln in got} == {"Front", "Inner"} else None
    got = wait_for(lines)
    assert {ln["trace_id"] for ln in got} == {"4bf92f3577b34da6a3ce929d0e0e4736"}
    # a malformed one is ignored, and the request is served as any other
    r = httpx.get(url, headers={"traceparent": "00-xyz-bad"})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    got = wait_for(lambda: httpx.get(f"{base}/api/logs",
                                     params={"request_id": rid}).json()["lines"])
    assert {ln["trace_id"] for ln in got} == {""}


def test_grpc_metrics_request_id_and_traceparent():
    import grpc
    from apps.observe_apps import GrpcEcho
    from protos import fleet_echo_pb2 as pb
    from protos import fleet_echo_pb2_grpc as pb_grpc
    fleet.shutdown()
    fleet.start(http_options={"port": 0}, grpc_options={
        "port": 0,
        "grpc_servicer_functions": ["protos.fleet_echo_pb2_grpc."
                                    "add_EchoServiceServicer_to_server"]})
    try:
        fleet.run(GrpcEcho.bind(), name="gecho", route_prefix="/gecho")
        port = fleet.status()["proxies"]["grpc"]["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EchoServiceStub(channel)
            md = (("application", "gecho"), ("x-request-id", "grpc-id-1"),
                  ("traceparent", TRACEPARENT))
            for _ in range(3):
                reply = stub.Say(pb.EchoRequest(text="hi"), metadata=md)
                assert reply.text == "grpc-id-1 4bf92f3577b34da6a3ce929d0e0e4736"
            with pytest.raises(grpc.RpcError) as err:
                stub.Say(pb.EchoRequest(text="boom"), metadata=md[:1])
            assert err.value.code() == grpc.StatusCode.INTERNAL
        route = "/fleettest.EchoService/Say"
        wait_for(lambda: _counter("fleet_grpc_requests_total", route=route,
                                  status_code="OK") == 3
                 and _counter("fleet_grpc_requests_total", route=route,
                              status_code="INTERNAL") == 1)
        assert _hist_cells("fleet_grpc_request_duration_seconds", route=route)
    finally:
        fleet.shutdown()


def _readme_section(title: str) -> str:
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
        text = f.read()
    start = text.index(f"\n### {title}\n")
    end = text.find("\n### ", start + 1)
    end2 = text.find("\n## ", start + 1)
    return text[start:min(e for e in (end, end2) if e != -1)]


def test_readme_metrics_table_and_grafana_dashboard_name_fleets_metrics():
    from fleet._controller.metrics import METRICS
    table = _readme_section("Metrics")
    named = set()
    for row in re.findall(r"^\| (`fleet_.+?) \|", table, re.M):
        named |= set(re.findall(r"`(fleet_\w+)`", row))
    assert named == set(METRICS)
    root = os.path.dirname(os.path.dirname(__file__))
    with open(os.path.join(root, "docs", "grafana", "fleet-dashboard.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs
            for n in re.findall(r"\b(fleet_\w+)", e)}
    assert used == set(METRICS), used ^ set(METRICS)


def test_readme_request_id_example(instance):
    block = re.search(r"```python\n(.*?)```", _readme_section("Logs and request ids"), re.S)
    assert block
    namespace: dict[str, Any] = {"__name__": "readme_request_ids"}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    fleet.run(namespace["app"], name="readme", route_prefix="/readme")
    r = httpx.get(f"{instance.http_url}/readme")
    assert r.json() == {"front_id": r.headers["x-request-id"],
                        "inner_id": r.headers["x-request-id"]}


def test_the_management_server_serves_the_observation_routes():
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0},
                management_options={"port": 0})
    try:
        inst = _api._instance
        assert isinstance(inst, _api.Instance) and inst.ops is not None
        fleet.run(front, name="managed", route_prefix="/managed")
        url, headers = inst.ops.url(), {"Authorization": f"Bearer {inst.ops.token}"}
        assert httpx.get(f"{url}/api/top").status_code == 401          # the token's rule
        rows = httpx.get(f"{url}/api/top", headers=headers).json()["rows"]
        assert {(r["application"], r["deployment"]) for r in rows} == {
            ("managed", "Front"), ("managed", "Inner")}

        def scraped() -> str | None:
            text = httpx.get(f"{url}/metrics", headers=headers).text
            return text if 'fleet_replicas{application="managed"' in text else None
        assert "# TYPE fleet_replicas gauge" in wait_for(scraped)
        bad = httpx.get(f"{url}/api/metrics/series", headers=headers)
        assert bad.status_code == 422 and bad.json()["request_id"]
    finally:
        fleet.shutdown()
