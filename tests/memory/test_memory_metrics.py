"""The metrics pieces on their own: a process's recorder, the controller's store and its
history, Prometheus text, window figures, and the log files' reader (no process, no
socket; history samples carry the times the test gives)."""

from __future__ import annotations

import io
import json
import logging
import math
import time
from typing import Any

import pytest

from fleet import _logs
from fleet._context import set_request_id
from fleet._controller import metrics as m
from fleet._metrics import MAX_KEYS, TIME_BUCKETS, Recorder

LB = (("application", "a"), ("deployment", "D"))


def test_recorder_sends_what_changed_and_starts_again_from_zero() -> None:
    rec = Recorder()
    calls = rec.counter("fleet_handle_requests_total", ("application", "deployment"))
    hist = rec.histogram("fleet_http_request_duration_seconds", ("application", "status_code"),
                         count_name="fleet_http_requests_total")
    calls.inc(("a", "D"))
    calls.inc(("a", "D"))
    hist.observe(("a", 200), 0.003)
    hist.observe(("a", 200), 100.0)          # past the last bound: +Inf
    rec.set("fleet_ongoing_requests", LB, 3)
    taken = rec.take()
    assert taken["counters"] == [
        ("fleet_handle_requests_total", LB, 2),
        ("fleet_http_requests_total", (("application", "a"), ("status_code", "200")), 2)]
    (name, labels, cells, buckets), = taken["hists"]
    assert buckets == TIME_BUCKETS and cells[TIME_BUCKETS.index(0.005)] == 1
    assert cells[len(TIME_BUCKETS)] == 1 and cells[-1] == pytest.approx(100.003)
    assert taken["gauges"] == [("fleet_ongoing_requests", LB, 3)]
    again = rec.take()
    assert again["counters"] == [] and again["hists"] == []       # nothing new
    assert again["gauges"] == taken["gauges"]                     # gauges go every time


def test_recorder_keeps_a_bounded_number_of_label_sets() -> None:
    rec = Recorder()
    fam = rec.counter("c", ("route",))
    for i in range(MAX_KEYS + 50):
        fam.inc((f"/r{i}",))
    assert len(fam.series) == MAX_KEYS


def _store_with(requests: int, errors: int, seconds: float = 0.004) -> m.Store:
    store = m.Store()
    cells = [0.0] * (len(TIME_BUCKETS) + 2)
    from bisect import bisect_left
    cells[bisect_left(TIME_BUCKETS, seconds)] = requests
    cells[-1] = requests * seconds
    store.merge("p1", {"counters": [("fleet_replica_errors_total", LB, errors)],
                       "hists": [("fleet_replica_processing_seconds", LB, cells,
                                  TIME_BUCKETS)],
                       "gauges": [("fleet_ongoing_requests", LB, 2)]})
    return store


def test_prometheus_text() -> None:
    store = _store_with(4, 1)
    store.merge("p2", {"counters": [], "hists": [],
                       "gauges": [("fleet_ongoing_requests", LB, 3)]})
    store.inc("fleet_replica_starts_total", (("application", 'we"ird\n\\'),))
    text = store.prometheus()
    assert "# TYPE fleet_replica_processing_seconds histogram" in text
    assert 'fleet_replica_processing_seconds_bucket{application="a",deployment="D",' \
        'le="0.0025"} 0' in text
    assert 'fleet_replica_processing_seconds_bucket{application="a",deployment="D",' \
        'le="0.005"} 4' in text
    assert 'fleet_replica_processing_seconds_bucket{application="a",deployment="D",' \
        'le="+Inf"} 4' in text
    assert 'fleet_replica_processing_seconds_count{application="a",deployment="D"} 4' in text
    assert "# TYPE fleet_ongoing_requests gauge" in text
    # gauges of two processes add up; a gone process' gauges leave
    assert 'fleet_ongoing_requests{application="a",deployment="D"} 5' in text
    store.drop("p2")
    assert 'fleet_ongoing_requests{application="a",deployment="D"} 2' in store.prometheus()
    assert 'fleet_replica_starts_total{application="we\\"ird\\n\\\\"} 1' in text
    assert text.endswith("\n")


def test_history_rates_quantiles_and_window_figures() -> None:
    store = m.Store()
    now = time.time()
    from bisect import bisect_left
    for k in range(11):                  # 10 requests of 4 ms each second, one error each 5 s
        cells = [0.0] * (len(TIME_BUCKETS) + 2)
        cells[bisect_left(TIME_BUCKETS, 0.004)] = 10
        cells[-1] = 0.04
        store.merge("p", {"counters": [("fleet_replica_errors_total", LB, 1)]
                          if k % 5 == 0 and k else [],
                          "hists": [("fleet_replica_processing_seconds", LB, cells,
                                     TIME_BUCKETS)],
                          "gauges": []})
        store.sample(now - 10 + k)
    got = store.series("fleet_replica_processing_seconds", {"application": "a"}, 60,
                       rate=True)
    (series,) = got["series"]
    assert got["resolution_s"] == 1.0
    assert [p[1] for p in series["points"]] == [10.0] * 10
    q = store.series("fleet_replica_processing_seconds", {}, 60, quantile=0.5)
    assert all(0.0025 < p[1] <= 0.005 for p in q["series"][0]["points"])
    figures = m.summary(store, "a", "D", 60)
    assert figures["requests_per_s"] == pytest.approx(10.0)
    assert 0.0025 < figures["p50_s"] <= 0.005 and 0.0025 < figures["p99_s"] <= 0.005
    assert figures["error_rate"] == pytest.approx(2 / 100)
    assert m.summary(store, "other", None)["requests_per_s"] == 0.0
    # a label filter that matches nothing, and an unknown name, give no series
    assert store.series("fleet_replica_processing_seconds", {"application": "b"})["series"] \
        == []
    assert store.series("nothing_like_it", {})["series"] == []


def test_tiers_are_rings_of_fixed_size() -> None:
    tier = m.Tier(1.0, 5)
    for t in range(12):
        tier.add(float(t), {("x", ()): float(t)})
        if t == 6:
            tier.add(6.5, {("x", ()): 6.5, ("late", ()): 1.0})
    assert len(tier.times) == 5 and all(len(c) == 5 for c in tier.cols.values())
    order = tier.order(0)
    assert [tier.times[i] for i in order] == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert [tier.cols[("x", ())][i] for i in order] == [7.0, 8.0, 9.0, 10.0, 11.0]
    tier.forget([("x", ())])             # "late" has no value left in the ring
    assert ("late", ()) not in tier.cols


def test_the_store_keeps_at_most_max_series(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(m, "MAX_SERIES", 10)
    store = m.Store()
    with caplog.at_level(logging.WARNING, "fleet.controller"):
        for i in range(25):
            store.inc("c", (("replica", str(i)),))
    assert len(store.counters) == 10
    assert sum("its limit" in r.getMessage() for r in caplog.records) == 1


def test_bucket_quantile_interpolates_like_prometheus() -> None:
    les = [1.0, 2.0, math.inf]
    assert m._bucket_quantile(0.5, les, [0, 10, 10]) == pytest.approx(1.5)
    assert m._bucket_quantile(0.99, les, [0, 0, 5]) == 2.0       # in +Inf: its lower edge
    assert m._bucket_quantile(0.5, les, [0, 0, 0]) is None


def test_log_files_json_lines_read_and_follow(tmp_path) -> None:
    handler = _logs.setup(str(tmp_path), "replica-a-D-1.log", "a", "D", "D-1",
                          logger="obs.test")
    assert handler is not None
    log = logging.getLogger("obs.test")
    log.setLevel(logging.INFO)
    try:
        set_request_id(b"req-1")
        log.info("first %s", "line")
        set_request_id("req-2")
        log.warning("second line")
        set_request_id(None)
        handler.flush()
        raw = (tmp_path / "replica-a-D-1.log").read_text().splitlines()
        first = json.loads(raw[0])
        assert {k: first[k] for k in ("level", "application", "deployment", "replica",
                                      "request_id", "message")} == {
            "level": "INFO", "application": "a", "deployment": "D", "replica": "D-1",
            "request_id": "req-1", "message": "first line"}
        assert first["timestamp"].endswith("Z")
        assert [ln["message"] for ln in _logs.read(str(tmp_path))] == ["first line",
                                                                       "second line"]
        assert [ln["message"] for ln in _logs.read(str(tmp_path), request_id="req-2")] == [
            "second line"]
        assert _logs.read(str(tmp_path), grep="first", deployment="Other") == []
        assert _logs.read(str(tmp_path), system=True) == []
        assert len(_logs.read(str(tmp_path), limit=1)) == 1
        tail = _logs.follow(str(tmp_path), application="a")
        assert next(tail) == []                 # what was there before is not repeated
        log.info("third line")
        assert [ln["message"] for ln in next(tail)] == ["third line"]   # written at once
    finally:
        logging.getLogger("obs.test").removeHandler(handler)
        handler.close()


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600),
                                           ("2h", 7200), ("1.5d", 129600)])
def test_since(text: str, seconds: float) -> None:
    assert _logs.parse_since(text) == seconds


def test_since_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="10m, 2h"):
        _logs.parse_since("yesterday")


def test_log_files_rotate_and_the_reader_reads_them_all(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_logs, "ROTATE_BYTES", 2000)
    monkeypatch.setattr(_logs, "BUFFER_BYTES", 300)     # lines wait in memory until then
    sink = _logs.Sink(str(tmp_path / "proxy-http-0.log"))
    tee = _logs.Tee(io.StringIO(), sink, "stderr", {"application": "", "deployment": "",
                                                     "replica": "proxy-http-0"})
    try:
        for i in range(60):
            # several lines in one write, one of them partial until the next write
            tee.write(f'line {i} "quoted" \\ é\nsecond {i}\npart')
            tee.write(f"ial {i}\n")
    finally:
        sink.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "proxy-http-0.log" and len(names) == 1 + _logs.BACKUPS
    assert all(p.stat().st_size < 2000 + 300 + 400 for p in tmp_path.iterdir())
    lines = _logs.read(str(tmp_path), system=True, limit=10000)
    messages = [ln["message"] for ln in lines]
    assert messages[-3:] == ['line 59 "quoted" \\ é', "second 59", "partial 59"]
    assert all(ln["logger"] == "stderr" and ln["replica"] == "proxy-http-0" for ln in lines)
    # what rotated past the last backup is gone: memory and disk stay bounded
    assert len(messages) < 180


def test_output_lines_wait_in_memory_until_a_flush_and_keep_their_order(tmp_path) -> None:
    handler = _logs.setup(str(tmp_path), "replica-a-D-2.log", "a", "D", "D-2",
                          logger="obs.order")
    assert handler is not None
    log = logging.getLogger("obs.order")
    log.setLevel(logging.INFO)
    tee = _logs.Tee(io.StringIO(), handler.sink, "stdout", {"application": "a",
                                                             "deployment": "D",
                                                             "replica": "D-2"})
    try:
        tee.write("printed first\n")                  # in memory, for at most FLUSH_S
        log.info("logged second")                       # a record writes both, in order
        assert [ln["message"] for ln in _logs.read(str(tmp_path))] == [
            "printed first", "logged second"]
        tee.write("printed third\n")
        _logs.flush_all()                               # what a process does at exit
        assert [ln["message"] for ln in _logs.read(str(tmp_path))][-1] == "printed third"
    finally:
        logging.getLogger("obs.order").removeHandler(handler)
        handler.close_file()


def _dep(**config: Any) -> Any:
    from fleet._config import DeploymentConfig
    from fleet._controller.state import DeploymentState
    from fleet._plan import DeploymentPlan
    plan = DeploymentPlan(name="D", config=DeploymentConfig(name="D", **config),
                          serialized_def=b"", code_version="v1")
    return DeploymentState(app="a", plan=plan, target=2)


def test_reasons_say_why_a_deployment_is_not_converged() -> None:
    from fleet._controller.state import ReplicaRecord
    from fleet._controller.views import reason
    from fleet._types import DeploymentStatus, ReplicaState
    now = time.monotonic()
    dep = _dep()
    dep.status = DeploymentStatus.HEALTHY
    assert reason(dep, now) == ""
    dep.status = DeploymentStatus.UPDATING
    version = dep.plan.version
    dep.replicas["r1"] = ReplicaRecord(replica_id="r1", version=version,
                                       state=ReplicaState.RUNNING)
    dep.replicas["r2"] = ReplicaRecord(replica_id="r2", version=version)     # STARTING
    assert reason(dep, now) == "waiting for resources: 1 replica process(es) starting"
    dep.replicas["r2"].message = "constructor running"
    assert reason(dep, now) == "1 replica(s) starting: constructor running"
    dep.last_unhealthy = (now - 5, "replica r0: check_health raised OSError: disk")
    assert reason(dep, now).startswith("health check failing: replica r0: check_health")
    assert reason(dep, now + 120).startswith("1 replica(s) starting")  # an old failure
    dep.last_unhealthy = None
    dep.autoscaler = object()
    dep.scaling_log.append({"time": 0, "from": 1, "to": 2, "reason": "load 3.5 wants 2"})
    assert reason(dep, now).startswith("scaling up for load from 1 to 2: load 3.5 wants 2")
    dep.status = DeploymentStatus.DEPLOY_FAILED
    dep.error_type = "ValueError"
    dep.message = "the constructor of deployment 'D' raised ValueError: bad"
    dep.traceback = "Traceback (most recent call last):\n" + "".join(
        f'  File "m.py", line {i}, in f\n' for i in range(20)) + "ValueError: bad\n"
    text = reason(dep, now)
    assert text.startswith("constructor failed: the constructor of deployment 'D' raised")
    assert text.splitlines()[-1] == "ValueError: bad"
    assert len(text.splitlines()) == 1 + 6                     # the traceback's last lines


def test_a_gone_replicas_series_are_forgotten() -> None:
    store = m.Store()
    for rid in ("r1", "r2"):
        store.inc("fleet_replica_requests_total", LB + (("replica", rid),), 3)
    store.inc("fleet_replica_starts_total", LB, 2)
    store.forget("replica", "r1")
    assert sorted(store.counters) == [
        ("fleet_replica_requests_total", LB + (("replica", "r2"),)),
        ("fleet_replica_starts_total", LB)]
