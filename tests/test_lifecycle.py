"""Graceful shutdown, __del__, user_config/reconfigure and rolling updates under load,
on the memory backend (the controller's logic; what processes add is in test_health and
test_core). Replicas are told apart by their replica ids, and by a token each object
makes, since they share this process's pid."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid

import httpx
import pytest
from helpers import replicas as _replicas
from helpers import wait_for

import fleet


@fleet.deployment(graceful_shutdown_timeout_s=5, health_check_period_s=0.2)
class Finisher:
    def __init__(self, marks: str) -> None:
        self.marks = marks
        self.token = uuid.uuid4().hex
        open(os.path.join(self.marks, f"init-{self.token}"), "w").close()

    async def slow(self, seconds: float) -> str:
        open(os.path.join(self.marks, f"started-{self.token}"), "w").close()
        await asyncio.sleep(seconds)    # the work a draining replica must finish
        return "finished"

    async def ident(self) -> str:
        return self.token

    def __del__(self) -> None:
        open(os.path.join(self.marks, f"del-{self.token}"), "w").close()


@fleet.deployment(graceful_shutdown_timeout_s=2)
class AsyncFinisher:
    def __init__(self, marks: str) -> None:
        self.marks = marks
        self.token = uuid.uuid4().hex

    async def ident(self) -> str:
        return self.token

    async def __del__(self) -> None:
        await asyncio.sleep(0)
        open(os.path.join(self.marks, f"adel-{self.token}"), "w").close()


@fleet.deployment(num_replicas=2, user_config={"threshold": 1})
class Tunable:
    def __init__(self) -> None:
        self.calls = 0
        self.config: dict = {}

    def reconfigure(self, config: dict) -> None:
        self.calls += 1
        if config["threshold"] < 0:
            raise ValueError("threshold must be >= 0")
        self.config = config

    def get(self) -> tuple[dict, int]:
        return self.config, self.calls


@fleet.deployment(num_replicas=2, max_ongoing_requests=8, graceful_shutdown_timeout_s=5)
class Versioned:
    def __init__(self, version: str) -> None:
        self.version = version

    async def __call__(self, request=None) -> str:
        await asyncio.sleep(0.005)
        return self.version


def _wait_for(cond, timeout_s: float = 15.0):
    return wait_for(cond, timeout_s)




def _ids(app: str, dep: str) -> set[str]:
    return {r["replica_id"] for r in _replicas(app, dep)}


def _marks(path, kind: str) -> set[str]:
    return {p.name.partition("-")[2] for p in path.iterdir() if p.name.startswith(kind + "-")}


def test_delete_finishes_in_flight_calls_then_runs_del(memory_instance, tmp_path) -> None:
    handle = fleet.run(Finisher.bind(str(tmp_path)), name="finish", route_prefix=None)
    token = handle.ident.remote().result()
    resp = handle.slow.remote(0.5)
    _wait_for(lambda: (tmp_path / f"started-{token}").exists())
    fleet.delete("finish")
    assert resp.result(timeout_s=10) == "finished"
    assert (tmp_path / f"del-{token}").exists()


def test_scale_down_drains_one_replica_and_runs_its_del(memory_instance, tmp_path) -> None:
    app = Finisher.options(num_replicas=2).bind(str(tmp_path))
    handle = fleet.run(app, name="shrink", route_prefix=None)
    ids, tokens = _ids("shrink", "Finisher"), _marks(tmp_path, "init")
    assert len(ids) == len(tokens) == 2
    fleet.run(Finisher.options(num_replicas=1).bind(str(tmp_path)), name="shrink",
              route_prefix=None)
    left = _wait_for(lambda: len(_ids("shrink", "Finisher")) == 1 and _ids("shrink", "Finisher"))
    assert left < ids       # the survivor is one of the two: a live change, no restart
    gone = _wait_for(lambda: _marks(tmp_path, "del"))
    survivor = handle.ident.remote().result()
    assert gone == tokens - {survivor} and _marks(tmp_path, "init") == tokens


def test_async_del_runs_on_shutdown(memory_instance, tmp_path) -> None:
    handle = fleet.run(AsyncFinisher.bind(str(tmp_path)), name="adel", route_prefix=None)
    token = handle.ident.remote().result()
    fleet.shutdown()
    assert (tmp_path / f"adel-{token}").exists()


def test_user_config_change_reconfigures_live_replicas_without_restart(memory_instance) -> None:
    handle = fleet.run(Tunable.bind(), name="tune", route_prefix=None)
    before = _ids("tune", "Tunable")
    for _ in range(10):
        assert handle.get.remote().result() == ({"threshold": 1}, 1)   # called once at start
    fleet.run(Tunable.options(user_config={"threshold": 7}).bind(), name="tune",
              route_prefix=None)
    assert _ids("tune", "Tunable") == before
    for _ in range(10):
        # once at start, once for the change
        assert handle.get.remote().result() == ({"threshold": 7}, 2)


def test_failing_reconfigure_fails_the_deploy_and_keeps_the_old_config(memory_instance) -> None:
    handle = fleet.run(Tunable.bind(), name="tune", route_prefix=None)
    before = _ids("tune", "Tunable")
    with pytest.raises(fleet.DeploymentFailedError,
                       match="reconfigure raised ValueError: threshold must be >= 0"):
        fleet.run(Tunable.options(user_config={"threshold": -1}).bind(), name="tune",
                  route_prefix=None)
    dep = fleet.status()["applications"]["tune"]["deployments"]["Tunable"]
    assert dep["status"] == "DEPLOY_FAILED" and "previous user_config" in dep["message"]
    assert {handle.get.remote().result()[0]["threshold"] for _ in range(6)} == {1}
    fleet.run(Tunable.options(user_config={"threshold": 3}).bind(), name="tune",
              route_prefix=None)
    assert _ids("tune", "Tunable") == before
    assert {handle.get.remote().result()[0]["threshold"] for _ in range(6)} == {3}


def _load(stop: threading.Event, call, results: list, errors: list) -> None:
    while not stop.is_set():
        try:
            results.append(call())
        except Exception as exc:  # noqa: BLE001 - counted by the test
            errors.append(repr(exc))


@pytest.mark.both_backends
def test_rolling_update_under_load_fails_no_request(instance) -> None:
    handle = fleet.run(Versioned.bind("v1"), name="roll", route_prefix="/roll")
    old_ids = _ids("roll", "Versioned")
    stop = threading.Event()
    results: list[str] = []
    errors: list[str] = []
    client = httpx.Client(base_url=instance.http_url, timeout=20)

    def http_call() -> str:
        r = client.get("/roll")
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        return r.text

    threads = [threading.Thread(target=_load, args=(stop, lambda: handle.remote().result(
        timeout_s=20), results, errors)) for _ in range(3)]
    threads += [threading.Thread(target=_load, args=(stop, http_call, results, errors))
                for _ in range(2)]
    samples: list[tuple[int, int]] = []      # (RUNNING, STARTING) during the update
    updating = threading.Event()

    def watch() -> None:
        while updating.is_set():
            states = [r["state"] for r in _replicas("roll", "Versioned")]
            samples.append((states.count("RUNNING"), states.count("STARTING")))

    watcher = threading.Thread(target=watch)
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: len(results) > 20)
        updating.set()
        watcher.start()
        fleet.run(Versioned.bind("v2"), name="roll", route_prefix="/roll")
        updating.clear()
        watcher.join(10)
        mark = len(results)
        _wait_for(lambda: len(results) > mark + 20)
    finally:
        updating.clear()
        stop.set()
        for t in threads:
            t.join(30)
        client.close()
    assert errors == []
    assert results[-1] == "v2" and "v1" in results
    # a few at a time (a quarter of 2, at least one) and never below the target
    assert samples and min(r for r, _ in samples) >= 2
    assert max(s for _, s in samples) == 1, samples
    assert not _ids("roll", "Versioned") & old_ids


@fleet.deployment(graceful_shutdown_timeout_s=1)
class WaitsForFile:
    """A constructor that waits (at most 60 s) for a file the test writes."""

    def __init__(self, path: str) -> None:
        import time
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)


def test_run_fails_when_its_application_is_deleted_while_it_deploys(instance, tmp_path
                                                                    ) -> None:
    go = tmp_path / "go"
    outcome: list[BaseException | None] = []

    def deploy() -> None:
        try:
            fleet.run(WaitsForFile.bind(str(go)), name="doomed", route_prefix="/doomed")
            outcome.append(None)
        except BaseException as exc:     # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    runner = threading.Thread(target=deploy)
    runner.start()
    try:
        wait_for(lambda: "doomed" in fleet.status()["applications"]
                 and _replicas("doomed", "WaitsForFile"), 30, "the replica starting")
        fleet.delete("doomed")
    finally:
        go.touch()
        runner.join(60)
    assert not runner.is_alive()
    assert isinstance(outcome[0], fleet.FleetError), outcome
    assert "'doomed' was deleted while deploying" in str(outcome[0])
    assert "doomed" not in fleet.status()["applications"]


@fleet.deployment(num_replicas=2)
class Pid:
    def __call__(self) -> int:
        return os.getpid()


def test_replicas_a_stop_signal_also_reached_are_not_replaced(instance, caplog) -> None:
    # SIGTERM to `fleet run`'s whole process group (systemd's default, `timeout`, a
    # supervisor's killpg) reaches its replicas too, and each stops on its own. Once the
    # driver has seen the signal, their exits are part of the shutdown: no replacement,
    # no "replacing it" warning, no replica_died event. (How the controller learns of
    # the signal before the main thread runs its handler: test_cli.)
    import signal

    from fleet import _api
    fleet.run(Pid.bind(), name="sig", route_prefix=None)
    pids = [r["pid"] for r in _replicas("sig", "Pid")]
    assert len(pids) == 2
    _api._going_down()                  # what the driver's handler does first
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not _replicas("sig", "Pid"), 30, "both replicas gone from status")
    assert "replacing it" not in caplog.text
    owned = _api._instance
    assert isinstance(owned, _api.Instance) and owned.controller is not None
    assert owned.controller.going_down
    kinds = [e["kind"] for e in owned.controller.events.since()]
    assert "replica_died" not in kinds, kinds
