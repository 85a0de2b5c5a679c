"""Autoscaling on the memory backend (the controller's decisions, the callers' load
reports, HTTP through the proxy's app): scale up on queued load, down when idle, to zero
and back; each decision logged with its reason in status."""

from __future__ import annotations

import asyncio
import logging
import time

import yaml

import fleet
from fleet._config import DeploymentConfig, FleetConfig


@fleet.deployment(max_ongoing_requests=1000)
class Gate:
    """Holds calls until opened: lets tests keep load steady without sleeping."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.waiting = 0

    async def wait(self) -> None:
        self.waiting += 1
        try:
            await self.event.wait()
        finally:
            self.waiting -= 1

    async def open(self) -> None:
        self.event.set()

    async def count(self) -> int:
        return self.waiting


@fleet.deployment(max_ongoing_requests=1, health_check_period_s=0.2,
                  graceful_shutdown_timeout_s=1,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 3,
                                      "target_ongoing_requests": 1, "upscale_delay_s": 0,
                                      "downscale_delay_s": 0.5, "look_back_period_s": 0.5})
class Worker:
    def __init__(self, gate) -> None:
        self.gate = gate

    async def __call__(self) -> str:
        await self.gate.wait.remote()
        return "done"


@fleet.deployment(graceful_shutdown_timeout_s=1,
                  autoscaling_config={"min_replicas": 0, "max_replicas": 1,
                                      "initial_replicas": 0, "downscale_delay_s": 0.3,
                                      "look_back_period_s": 0.3})
class Sleepy:
    async def __call__(self, request=None) -> str:
        return "awake"


def _wait_for(cond, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _dep(app: str, name: str) -> dict:
    return fleet.status()["applications"][app]["deployments"][name]


def _running(app: str, name: str) -> int:
    return len([r for r in _dep(app, name)["replicas"] if r["state"] == "RUNNING"])


def test_scales_up_on_queued_calls_and_down_when_idle(memory_instance, caplog) -> None:
    caplog.set_level(logging.INFO, logger="fleet.autoscaler")
    controller = memory_instance.controller
    reported: list[str] = []
    on_load = controller._on_load
    controller._on_load = lambda msg: (reported.append(msg["key"]), on_load(msg))
    gate = fleet.run(Gate.bind(), name="gate", route_prefix=None)
    worker = fleet.run(Worker.bind(gate), name="worker", route_prefix=None)
    assert _running("worker", "Worker") == 1
    calls = [worker.remote() for _ in range(3)]
    _wait_for(lambda: _dep("worker", "Worker")["target_replicas"] == 3)
    _wait_for(lambda: _running("worker", "Worker") == 3)
    _wait_for(lambda: gate.count.remote().result() == 3)    # queued calls were dispatched
    log = _dep("worker", "Worker")["scaling_log"]
    assert log[0]["from"] == 1 and log[-1]["to"] == 3
    assert "target_ongoing_requests" in log[-1]["reason"]
    gate.open.remote().result()
    assert [c.result(timeout_s=10) for c in calls] == ["done"] * 3
    _wait_for(lambda: _dep("worker", "Worker")["target_replicas"] == 1)
    _wait_for(lambda: len(_dep("worker", "Worker")["replicas"]) == 1)
    last = _dep("worker", "Worker")["scaling_log"][-1]
    assert last["to"] == 1 and "downscale_delay_s" in last["reason"]
    logged = [r.getMessage() for r in caplog.records if r.name == "fleet.autoscaler"]
    assert any(m.startswith("scaling worker/Worker from 1 to 3 replicas: load") for m in logged)
    assert any(m.startswith("scaling worker/Worker from 3 to 1") for m in logged)
    # Worker's replicas call Gate all along, but only autoscaling deployments get reports
    assert set(reported) == {"worker#Worker"}


def test_autoscaling_config_from_yaml() -> None:
    from fleet._cli import apply_overrides
    from fleet._deployment import build_plans
    text = """
applications:
  - import_path: test_autoscaling:app
    deployments:
      - name: Worker
        autoscaling_config: {min_replicas: 2, max_replicas: 5, initial_replicas: 3,
                             target_ongoing_requests: 4, upscale_delay_s: 1,
                             downscale_delay_s: 7, look_back_period_s: 2}
"""
    cfg = FleetConfig(**yaml.safe_load(text))
    overrides = {d.name: d.overrides() for d in cfg.applications[0].deployments}
    plans = build_plans(apply_overrides(Worker.bind(Gate.bind()), overrides), "yaml")
    worker = next(p for p in plans if p.name == "Worker")
    a = worker.config.autoscaling_config
    assert a is not None and worker.config.target_replicas() == 3
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests, a.upscale_delay_s,
            a.downscale_delay_s, a.look_back_period_s) == (2, 5, 4, 1, 7, 2)


def test_scale_to_zero_and_back_for_handles_and_http(memory_instance) -> None:
    handle = fleet.run(Sleepy.bind(), name="sleepy", route_prefix="/sleepy")
    assert _dep("sleepy", "Sleepy")["replicas"] == []
    started = time.monotonic()
    assert handle.options(timeout_s=30).remote().result() == "awake"
    woke_in = time.monotonic() - started
    assert "scaled to zero" in _dep("sleepy", "Sleepy")["scaling_log"][0]["reason"]
    _wait_for(lambda: _dep("sleepy", "Sleepy")["target_replicas"] == 0)
    _wait_for(lambda: _dep("sleepy", "Sleepy")["replicas"] == [])
    r = memory_instance.http().get("/sleepy")
    assert (r.status_code, r.text) == (200, "awake")
    assert woke_in < 15


def test_num_replicas_auto_uses_documented_defaults() -> None:
    cfg = DeploymentConfig(name="x", num_replicas="auto")
    a = cfg.autoscaling_config
    assert a is not None
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (1, 10, 2.0)
    assert cfg.target_replicas() == 1


def test_serving_autoscaling_example_runs() -> None:
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "serving_autoscaling.py")],
                         capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "answer: 42" in out.stdout
