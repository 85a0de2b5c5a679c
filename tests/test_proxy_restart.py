"""A proxy that dies is started again by its instance, on the same port: HTTP, gRPC and
several HTTP proxies sharing one socket, on real processes, sockets and clients; a proxy
that cannot start again is retried with a bounded back-off."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from apps.proxy_apps import REFUSE_ENV
from helpers import replicas, wait_for

import fleet
from fleet import _api


@fleet.deployment
class Pid:
    def __call__(self, request: Any = None) -> int:
        return os.getpid()


def _proxy(kind: str) -> dict[str, Any]:
    """The kind's proxies in fleet.status() ({} while none serves)."""
    return dict(fleet.status()["proxies"].get(kind) or {})


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    # a child of this process: the instance reaps it (psutil sees a zombie till then)
    wait_for(lambda: not psutil.pid_exists(pid)
             or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
             f"proxy pid {pid} dies")


def _restart_messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fleet.proxies" and r.levelno == level]


@pytest.fixture(scope="module")
def served() -> Iterator[dict[str, Any]]:
    """An instance with one HTTP proxy (with a middleware that can be told to fail), one
    gRPC proxy and the management API; an app answering with its replica's pid."""
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0, "access_log": False,
                              "middlewares": ["apps.proxy_apps.RefuseWhenAsked"]},
                grpc_options={"host": "127.0.0.1", "port": 0},
                management_options={"port": 0})
    fleet.run(Pid.bind(), name="pid", route_prefix="/pid")
    inst = _api._instance
    assert isinstance(inst, _api.Instance) and inst.ops is not None
    client = httpx.Client(base_url=inst.ops.url(), timeout=30,
                          headers={"Authorization": f"Bearer {inst.ops.token}"})
    try:
        yield {"management": client}
    finally:
        client.close()
        fleet.shutdown()


def test_the_restart_delay_doubles_from_a_tenth_of_a_second_to_five_seconds() -> None:
    delays = [_api.restart_delay(n) for n in range(10)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]
    assert _api.restart_delay(10_000) == 5.0          # no overflow, still bounded
    assert _api.restart_delay(-1) == 0.1
    assert _api.restart_delay(3, first_s=1.0, max_s=2.0) == 2.0


def test_a_killed_http_proxy_is_replaced_on_the_same_port(served, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fleet.proxies")
    before = _proxy("http")
    url = f"http://127.0.0.1:{before['port']}/pid"
    replica_pid = httpx.get(url, timeout=20).json()
    _kill(before["pid"])
    after = wait_for(lambda: _proxy("http").get("pid") not in (None, before["pid"])
                     and _proxy("http"), 30, "a new HTTP proxy in fleet.status()")
    assert after["port"] == before["port"] and after["pids"] == [after["pid"]]
    assert psutil.Process(after["pid"]).is_running()
    reply = httpx.get(url, timeout=20)
    assert reply.status_code == 200 and reply.json() == replica_pid
    assert [r["pid"] for r in replicas("pid", "Pid")] == [replica_pid]   # not restarted
    warned = _restart_messages(caplog, logging.WARNING)
    assert any(f"HTTP proxy 0 (pid {before['pid']}) exited with code -9" in m
               for m in warned), warned
    events = served["management"].get("/api/events").json()["events"]
    restarted = [e for e in events if e["kind"] == "proxy_restarted"]
    assert restarted and f"(pid {before['pid']})" in restarted[-1]["message"]
    assert f"pid {after['pid']} serves port {before['port']}" in restarted[-1]["message"]


def test_a_killed_grpc_proxy_is_replaced_and_predict_answers_on_the_same_port(served) -> None:
    import grpc
    from test_grpc_predict import Doubler, Summer

    from fleet.dag import InputNode
    from fleet.drivers import DefaultgRPCDriver
    from fleet.generated import serve_pb2, serve_pb2_grpc
    graph = Summer.bind(Doubler.bind()).as_bytes.bind(InputNode())
    fleet.run(DefaultgRPCDriver.bind(graph), name="predict", route_prefix="/predict")
    before = _proxy("grpc")

    def predict() -> bytes:
        with grpc.insecure_channel(f"127.0.0.1:{before['port']}") as channel:
            reply = serve_pb2_grpc.PredictAPIsServiceStub(channel).Predict(
                serve_pb2.PredictRequest(input={"a": b"4", "b": b"1"}),
                metadata=(("application", "predict"),), timeout=20)
        return bytes(reply.prediction)

    try:
        assert predict() == b"10"
        _kill(before["pid"])
        after = wait_for(lambda: _proxy("grpc").get("pid") not in (None, before["pid"])
                         and _proxy("grpc"), 30, "a new gRPC proxy in fleet.status()")
        assert after["port"] == before["port"]
        assert predict() == b"10"
    finally:
        fleet.delete("predict")


def test_a_proxy_that_cannot_start_again_is_retried_with_a_growing_delay_saying_why(
        served, caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="fleet.proxies")
    before = _proxy("http")
    url = f"http://127.0.0.1:{before['port']}/pid"
    monkeypatch.setenv(REFUSE_ENV, "1")     # every replacement's middleware refuses
    _kill(before["pid"])

    def failures() -> list[str]:
        return [m for m in _restart_messages(caplog, logging.WARNING)
                if "could not start again" in m]
    seen = wait_for(lambda: len(failures()) >= 3 and failures(), 60,
                    "three failed starts of the HTTP proxy")
    assert all("asked to refuse to start" in m and f"on port {before['port']}" in m
               for m in seen), seen
    # each failure waits twice as long as the one before (the first wait depends on
    # how recently this proxy died before: earlier tests killed it too)
    died = next(m for m in _restart_messages(caplog, logging.WARNING)
                if f"(pid {before['pid']}) exited with code -9" in m)
    delays = [float(m.rsplit(" in ", 1)[1].removesuffix(" s")) for m in [died, *seen[:3]]]
    first = [_api.restart_delay(n) for n in range(4)].index(delays[0])
    assert delays == [_api.restart_delay(first + n) for n in range(4)], delays
    # no HTTP proxy serves: status still answers, without one
    assert "http" not in fleet.status()["proxies"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)
    # another process takes the port meanwhile: the tries say so, and go on
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", before["port"]))
        taken.listen()
        monkeypatch.delenv(REFUSE_ENV)
        wait_for(lambda: any("Address already in use" in m for m in failures()), 60,
                 "a failed start that names the taken port")
        assert "http" not in fleet.status()["proxies"]
    finally:
        taken.close()                       # the port is free: the next try serves it
    after = wait_for(lambda: _proxy("http").get("pid") and _proxy("http"), 30,
                     "the HTTP proxy serving again")
    assert after["port"] == before["port"]
    assert httpx.get(url, timeout=20).status_code == 200


def _fresh_instance(caplog: Any) -> _api.Instance:
    """A new instance of this process's own (the module's is stopped), with the proxy
    watch's log captured."""
    caplog.set_level(logging.INFO, logger="fleet.proxies")
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0})
    inst = _api._instance
    assert isinstance(inst, _api.Instance)
    return inst


def test_a_shutdown_does_not_restart_the_proxies_it_stops(caplog) -> None:
    inst = _fresh_instance(caplog)
    pid = _proxy("http")["pid"]
    fleet.shutdown()
    assert not psutil.pid_exists(pid)
    assert _restart_messages(caplog, logging.WARNING) == []
    assert inst.backend.procs == {} and inst._shared_sockets == []


def test_a_proxy_a_stop_signal_also_reached_is_not_restarted(caplog) -> None:
    # SIGTERM to fleet run's whole process group stops its proxies too; once the driver
    # has the signal, the watch starts none again before the shutdown that follows
    inst = _fresh_instance(caplog)
    try:
        pid = _proxy("http")["pid"]
        watch = inst._proxy_watch
        assert watch is not None and not watch.done()
        _api._going_down()                  # what the driver's signal handler does first
        os.kill(pid, signal.SIGTERM)
        wait_for(watch.done, 30, "the proxy watch to end")
        assert _restart_messages(caplog, logging.WARNING) == []
        assert inst.controller is not None
        kinds = [e["kind"] for e in inst.controller.events.since()]
        assert "proxy_restarted" not in kinds, kinds
    finally:
        fleet.shutdown()


def test_one_of_two_http_proxies_killed_the_port_answers_throughout(caplog) -> None:
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0, "num_proxies": 2,
                              "access_log": False})
    try:
        fleet.run(Pid.bind(), name="pid", route_prefix="/pid")
        before = _proxy("http")
        assert len(before["pids"]) == 2
        url = f"http://127.0.0.1:{before['port']}/pid"
        victim, survivor = before["pids"]
        _kill(victim)
        # the other proxy accepts on the same socket: every new connection is answered
        for _ in range(20):
            with httpx.Client(timeout=20) as client:
                assert client.get(url).status_code == 200
        after = wait_for(lambda: (p := _proxy("http")) and len(p["pids"]) == 2
                         and victim not in p["pids"] and p, 30,
                         "two HTTP proxies again in fleet.status()")
        assert survivor in after["pids"] and after["port"] == before["port"]
        (new,) = set(after["pids"]) - {survivor}
        # the new one accepts on the same socket (it holds the instance's copy)
        listening = [c for c in psutil.Process(new).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == before["port"]]
        assert listening
        answered_by: set[str] = set()

        def both() -> bool:
            for _ in range(10):
                with httpx.Client(timeout=20) as client:
                    reply = client.get(url)
                assert reply.status_code == 200
                answered_by.add(reply.headers["x-request-id"][:16])
            return len(answered_by) == 2
        wait_for(both, 30, "both HTTP proxies answering")
    finally:
        fleet.shutdown()
