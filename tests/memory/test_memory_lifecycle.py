"""The controller's lifecycle logic on the memory backend (fleet.testing): replicas as
tasks of this process, the real controller, router and data plane, the HTTP proxy's own
app. What only processes show (signals, crashes of a process, sockets) stays in the
tests that start them."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

import fleet
import fleet.testing
from fleet._deployment import Application, build_plans
from fleet._types import ReplicaState

T = TypeVar("T")


@fleet.deployment(num_replicas=2, health_check_period_s=0.05, graceful_shutdown_timeout_s=1)
class Model:
    def __init__(self, tag: str = "v1") -> None:
        self.tag = tag
        self.calls = 0

    def __call__(self, x: int) -> dict[str, Any]:
        self.calls += 1
        return {"tag": self.tag, "x": x}

    def fail(self, message: str) -> None:
        raise ValueError(message)

    async def hold(self) -> None:
        await asyncio.Event().wait()


@fleet.deployment(health_check_period_s=0.05)
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("no model file")


@fleet.deployment(health_check_period_s=0.05)
class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, request: Any) -> str:
        return self.name


class Memory:
    """A TestClient plus what tests ask of its instance's controller."""

    def __init__(self, client: fleet.testing.TestClient) -> None:
        self.client = client
        inst = client._session.instance
        assert inst is not None and inst.runtime is not None
        self.inst = inst
        self.rt = inst.runtime

    def ctl(self, method: str, *args: Any) -> Any:
        return self.inst.call(self.rt.call_controller(method, *args))

    def deploy(self, app: Application, name: str = "default",
               route_prefix: str | None = "/") -> None:
        self.ctl("deploy", name, route_prefix, build_plans(app, name), "http", None)
        self.ctl("wait_ready", name)

    def replicas(self, name: str = "default", dep: str = "Model") -> list[dict[str, Any]]:
        apps = self.ctl("status")["applications"]
        return list(apps[name]["deployments"][dep]["replicas"]) if name in apps else []

    def running(self, name: str = "default", dep: str = "Model") -> set[str]:
        return {r["replica_id"] for r in self.replicas(name, dep)
                if r["state"] == ReplicaState.RUNNING.value}


def until(cond: Callable[[], T], timeout_s: float = 20.0) -> T:
    """The controller works on its own loop: poll its status until cond() holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def mem() -> Iterator[Memory]:
    with fleet.testing.TestClient(Model.bind()) as client:
        yield Memory(client)


def test_a_user_exception_fails_the_call_and_not_the_replica(mem: Memory) -> None:
    before = mem.running()
    assert len(before) == 2
    handle = mem.client.get_handle()
    with pytest.raises(ValueError, match="bad input"):
        handle.fail.remote("bad input").result(timeout_s=30)
    assert handle.remote(1).result(timeout_s=30) == {"tag": "v1", "x": 1}
    assert mem.running() == before


def test_a_dead_replica_fails_no_later_call_and_is_replaced(mem: Memory) -> None:
    before = mem.running()
    victim = sorted(before)[0]
    backend = mem.inst.backend
    proc = backend.procs[victim]
    mem.inst.loop.call_soon_threadsafe(backend.kill, proc)
    after = until(lambda: (r := mem.running()) and victim not in r and len(r) == 2 and r)
    assert len(after - before) == 1
    handle = mem.client.get_handle()
    assert [handle.remote(i).result(timeout_s=30)["x"] for i in range(6)] == list(range(6))


def test_a_killed_replica_fails_its_calls_in_flight_at_once(mem: Memory) -> None:
    # as a process's exit closes its sockets, an ended memory replica closes its callers'
    # connections: a call it held fails, it does not hang
    handle = mem.client.get_handle()
    held = [handle.hold.remote() for _ in range(2)]
    assert handle.remote(1).result(timeout_s=30)["x"] == 1
    backend = mem.inst.backend
    for proc in list(backend.procs.values()):
        mem.inst.loop.call_soon_threadsafe(backend.kill, proc)
    for call in held:
        with pytest.raises(fleet.ReplicaDiedError):
            call.result(timeout_s=10)


def test_a_new_version_replaces_every_replica_and_a_count_change_keeps_them(
        mem: Memory) -> None:
    v1 = mem.running()
    mem.deploy(Model.options(num_replicas=3).bind())        # same code: count only
    assert v1 < mem.running() and len(mem.running()) == 3
    kept = mem.running()
    mem.deploy(Model.options(num_replicas=3).bind("v2"))    # new arguments: new version
    until(lambda: not (mem.running() & kept) and len(mem.running()) == 3)
    assert mem.client.get_handle().remote(5).result(timeout_s=30) == {"tag": "v2", "x": 5}


def test_a_constructor_that_raises_fails_the_deploy_and_says_why(mem: Memory) -> None:
    with pytest.raises(fleet.DeploymentFailedError, match="no model file"):
        mem.deploy(Broken.bind(), name="broken", route_prefix="/broken")
    app = mem.ctl("status")["applications"]["broken"]
    assert app["status"] == "DEPLOY_FAILED"
    # the other application is untouched
    assert mem.client.get_handle().remote(2).result(timeout_s=30)["x"] == 2


def test_a_deleted_application_is_gone_and_its_handles_say_so(mem: Memory) -> None:
    mem.deploy(Named.bind("other"), name="other", route_prefix="/other")
    other = fleet.DeploymentHandle("Named", "other")
    assert other.remote(None).result(timeout_s=30) == "other"
    mem.ctl("delete", "other")
    assert "other" not in mem.ctl("status")["applications"]
    with pytest.raises(fleet.FleetError):
        other.remote(None).result(timeout_s=30)


def test_traffic_split_and_back_through_the_proxy_app() -> None:
    with fleet.testing.TestClient(Named.bind("blue"), route_prefix="/svc") as client:
        mem = Memory(client)
        mem.deploy(Named.bind("green"), name="green", route_prefix=None)
        assert client.get("/svc").text == "blue"
        mem.ctl("set_traffic", "/svc", {"default": 0, "green": 1})
        assert {client.get("/svc").text for _ in range(10)} == {"green"}
        mem.ctl("set_traffic", "/svc", None)
        assert {client.get("/svc").text for _ in range(10)} == {"blue"}


def test_every_replica_of_the_memory_backend_runs_in_this_process(mem: Memory) -> None:
    assert {r["pid"] for r in mem.replicas()} == {os.getpid()}
