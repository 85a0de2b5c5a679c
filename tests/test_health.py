"""Health checks and crashes against real replicas: a failing or hanging check_health
gets the replica replaced, a SIGKILLed replica fails its calls at once and is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from helpers import replicas as _replicas
from helpers import wait_for

import fleet


@fleet.deployment(health_check_period_s=0.1, health_check_timeout_s=0.5,
                  graceful_shutdown_timeout_s=0.5)
class Fragile:
    def __init__(self) -> None:
        self.broken = False
        self.checks = 0

    def check_health(self) -> None:
        self.checks += 1
        if self.broken:
            raise RuntimeError("model weights went missing")

    def health_checks(self) -> int:
        return self.checks

    async def hold(self) -> None:
        await asyncio.Event().wait()

    def break_health(self) -> int:
        self.broken = True
        return os.getpid()

    def pid(self) -> int:
        return os.getpid()


@fleet.deployment(health_check_period_s=0.1, health_check_timeout_s=0.3,
                  graceful_shutdown_timeout_s=0.5)
class Stuck:
    def __init__(self) -> None:
        self.stuck = False

    async def check_health(self) -> None:
        if self.stuck:
            await asyncio.sleep(3600)

    async def get_stuck(self) -> int:
        self.stuck = True
        return os.getpid()

    async def pid(self) -> int:
        return os.getpid()


@fleet.deployment(num_replicas=2, health_check_period_s=0.2)
class Victim:
    async def hang(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        await asyncio.Event().wait()

    async def pid(self) -> int:
        return os.getpid()


def _wait_for(cond, timeout_s: float = 15.0):
    return wait_for(cond, timeout_s)




def _replaced(app: str, dep: str, old_pid: int):
    def check():
        running = [r for r in _replicas(app, dep) if r["state"] == "RUNNING"]
        return running if running and all(r["pid"] != old_pid for r in running) else None
    return check


def test_raising_check_health_marks_unhealthy_and_replaces_the_replica(instance) -> None:
    handle = fleet.run(Fragile.bind(), name="fragile", route_prefix=None)
    # called every health_check_period_s=0.1
    _wait_for(lambda: handle.health_checks.remote().result() >= 3, 2.0)
    held = handle.hold.remote()     # keeps the unhealthy replica draining for a while
    old = handle.break_health.remote().result()
    unhealthy = _wait_for(lambda: [r for r in _replicas("fragile", "Fragile")
                                   if r["pid"] == old and r["state"] == "UNHEALTHY"])
    assert unhealthy[0]["message"] == \
        "check_health raised RuntimeError: model weights went missing"
    # routing stopped at once: new calls reach the replacement only
    _wait_for(_replaced("fragile", "Fragile", old))
    assert old not in {handle.pid.remote().result() for _ in range(5)}
    # its call was given graceful_shutdown_timeout_s=0.5 to finish, then cut
    with pytest.raises(fleet.ReplicaDiedError):
        held.result(timeout_s=5)


def test_hanging_async_check_health_times_out_and_replica_is_replaced(instance) -> None:
    handle = fleet.run(Stuck.bind(), name="stuck", route_prefix=None)
    old = handle.get_stuck.remote().result()
    _wait_for(_replaced("stuck", "Stuck", old))
    assert handle.pid.remote().result() != old


def test_sigkilled_replica_fails_its_call_fast_and_is_replaced(instance, tmp_path) -> None:
    handle = fleet.run(Victim.bind(), name="victim", route_prefix=None)
    path = tmp_path / "pid"
    resp = handle.hang.remote(str(path))
    pid = int(_wait_for(lambda: path.exists() and path.read_text()))
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(fleet.ReplicaDiedError):
        resp.result(timeout_s=5)
    assert time.monotonic() - killed_at < 1.0
    # the controller noticed within a second
    _wait_for(lambda: pid not in [r["pid"] for r in _replicas("victim", "Victim")], 1.0)
    # next calls succeed on the other replica, then on it and the replacement
    pids = {handle.pid.remote().result(timeout_s=5) for _ in range(10)}
    assert pid not in pids
    _wait_for(lambda: len([r for r in _replicas("victim", "Victim")
                           if r["state"] == "RUNNING"]) == 2)


@fleet.deployment(health_check_period_s=0.1, health_check_timeout_s=5,
                  graceful_shutdown_timeout_s=0.5)
class ExitsInHealthCheck:
    def __init__(self) -> None:
        self.checks = 0

    def check_health(self) -> None:
        self.checks += 1
        if self.checks == 2:
            raise SystemExit("the user's code called sys.exit")

    def pid(self) -> int:
        import os
        return os.getpid()


def test_system_exit_in_check_health_marks_unhealthy_not_silent(instance):
    h = fleet.run(ExitsInHealthCheck.bind(), name="sysexit", route_prefix=None)
    first = h.pid.remote().result()
    deadline = time.monotonic() + 20
    while True:
        dep = fleet.status()["applications"]["sysexit"]["deployments"]["ExitsInHealthCheck"]
        running = [r for r in dep["replicas"] if r["state"] == "RUNNING"]
        if running and running[0]["pid"] != first:
            break
        assert time.monotonic() < deadline, dep
        time.sleep(0.05)
    assert h.pid.remote().result() != first
