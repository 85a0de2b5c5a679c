"""Health checks and crashes: a failing or hanging check_health gets the replica
replaced (on the memory backend: the controller's logic), a SIGKILLed replica process
fails its calls at once and is replaced (real processes). Memory replicas share this
process's pid, so each object makes a token that tells replicas apart."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest
from helpers import replicas as _replicas
from helpers import wait_for

import fleet


# a check that answers gets 5 s (a loaded machine can be slow to run it): the tests
# below are about checks that raise, not about checks that are late
@fleet.deployment(health_check_period_s=0.1, health_check_timeout_s=5,
                  graceful_shutdown_timeout_s=0.5)
class Fragile:
    def __init__(self) -> None:
        self.broken = False
        self.checks = 0
        self.token = uuid.uuid4().hex

    def check_health(self) -> None:
        self.checks += 1
        if self.broken:
            raise RuntimeError("model weights went missing")

    def health_checks(self) -> int:
        return self.checks

    async def hold(self) -> None:
        await asyncio.Event().wait()

    def break_health(self) -> str:
        self.broken = True
        return self.token

    def ident(self) -> str:
        return self.token


# the timeout under test: long enough that a healthy check is never late on a loaded
# machine (the replica would be replaced before it got stuck), short for one that hangs
@fleet.deployment(health_check_period_s=0.1, health_check_timeout_s=2,
                  graceful_shutdown_timeout_s=0.5)
class Stuck:
    def __init__(self) -> None:
        self.stuck = False
        self.token = uuid.uuid4().hex

    async def check_health(self) -> None:
        if self.stuck:
            await asyncio.sleep(3600)

    async def get_stuck(self) -> str:
        self.stuck = True
        return self.token

    async def ident(self) -> str:
        return self.token


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




def _only_replica(app: str, dep: str) -> str:
    (rep,) = _replicas(app, dep)
    return str(rep["replica_id"])


def _replaced(app: str, dep: str, old_id: str):
    def check():
        running = [r for r in _replicas(app, dep) if r["state"] == "RUNNING"]
        return running if running and all(r["replica_id"] != old_id for r in running) \
            else None
    return check


def test_raising_check_health_marks_unhealthy_and_replaces_the_replica(
        memory_instance) -> None:
    handle = fleet.run(Fragile.bind(), name="fragile", route_prefix=None)
    old_id = _only_replica("fragile", "Fragile")
    # called every health_check_period_s=0.1
    _wait_for(lambda: handle.health_checks.remote().result() >= 3)
    held = handle.hold.remote()     # keeps the unhealthy replica draining for a while
    old = handle.break_health.remote().result()
    unhealthy = _wait_for(lambda: [r for r in _replicas("fragile", "Fragile")
                                   if r["replica_id"] == old_id
                                   and r["state"] == "UNHEALTHY"])
    assert unhealthy[0]["message"] == \
        "check_health raised RuntimeError: model weights went missing"
    # routing stopped at once: new calls reach the replacement only
    _wait_for(_replaced("fragile", "Fragile", old_id))
    assert old not in {handle.ident.remote().result() for _ in range(5)}
    # its call was given graceful_shutdown_timeout_s=0.5 to finish, then cut
    with pytest.raises(fleet.ReplicaDiedError):
        held.result(timeout_s=5)


def test_hanging_async_check_health_times_out_and_replica_is_replaced(
        memory_instance) -> None:
    handle = fleet.run(Stuck.bind(), name="stuck", route_prefix=None)
    old_id = _only_replica("stuck", "Stuck")
    old = handle.get_stuck.remote().result()
    _wait_for(_replaced("stuck", "Stuck", old_id))
    assert handle.ident.remote().result() != old


def test_sigkilled_replica_fails_its_call_fast_and_is_replaced(instance, tmp_path) -> None:
    handle = fleet.run(Victim.bind(), name="victim", route_prefix=None)
    path = tmp_path / "pid"
    resp = handle.hang.remote(str(path))
    pid = int(_wait_for(lambda: path.exists() and path.read_text()))
    os.kill(pid, signal.SIGKILL)
    # the call never ends by itself: it fails because the replica's death was noticed
    # (a bound on how fast would be the loaded machine's speed, not fleet's)
    with pytest.raises(fleet.ReplicaDiedError):
        resp.result(timeout_s=15)
    # the controller noticed too
    _wait_for(lambda: pid not in [r["pid"] for r in _replicas("victim", "Victim")])
    # next calls succeed on the other replica, then on it and the replacement
    pids = {handle.pid.remote().result(timeout_s=15) for _ in range(10)}
    assert pid not in pids
    _wait_for(lambda: len([r for r in _replicas("victim", "Victim")
                           if r["state"] == "RUNNING"]) == 2)


@fleet.deployment(health_check_period_s=0.1, health_check_timeout_s=5,
                  graceful_shutdown_timeout_s=0.5)
class ExitsInHealthCheck:
    def __init__(self) -> None:
        self.checks = 0
        self.token = uuid.uuid4().hex

    def check_health(self) -> None:
        self.checks += 1
        if self.checks == 2:
            raise SystemExit("the user's code called sys.exit")

    def ident(self) -> str:
        return self.token


def test_system_exit_in_check_health_marks_unhealthy_not_silent(instance):
    # Real processes: a SystemExit out of user code ends the replica's event loop, which
    # only a process of its own survives (on the memory backend it is the instance's).
    h = fleet.run(ExitsInHealthCheck.bind(), name="sysexit", route_prefix=None)
    first_id = _only_replica("sysexit", "ExitsInHealthCheck")
    first = h.ident.remote().result()
    _wait_for(_replaced("sysexit", "ExitsInHealthCheck", first_id), 60)
    assert h.ident.remote().result() != first
