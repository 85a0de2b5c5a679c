"""Instances share nothing (in memory: fleet.testing, the memory backend): batch counts
belong to the replica that batched, graph node ids to their graph."""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from typing import Any

import pytest
from helpers import wait_for

import fleet
import fleet.testing
from fleet import dag


@fleet.deployment(health_check_period_s=0.05)
class Batcher:
    @fleet.batch(max_batch_size=4, batch_wait_timeout_s=30)
    async def __call__(self, items: list[int]) -> list[int]:
        return items


@fleet.deployment(health_check_period_s=0.05)
@fleet.batch(max_batch_size=4, batch_wait_timeout_s=30)
async def batched(items: list[int]) -> list[int]:
    return items


def _batch_counts(client: fleet.testing.TestClient, deployment: str,
                  method: str) -> dict[str, Any] | None:
    inst = client._session.instance
    assert inst is not None and inst.runtime is not None
    status = inst.call(inst.runtime.call_controller("status"))
    replicas = status["applications"]["default"]["deployments"][deployment]["replicas"]
    return replicas[0]["batches"].get(method) if replicas else None


def _four_calls(client: fleet.testing.TestClient, deployment: str = "Batcher",
                method: str = "Batcher.__call__") -> dict[str, Any]:
    handle = client.get_handle()
    responses = [handle.remote(i) for i in range(4)]    # one batch of four
    assert [r.result(timeout_s=30) for r in responses] == [0, 1, 2, 3]
    deadline = time.monotonic() + 30                     # the next health report has them
    while (found := _batch_counts(client, deployment, method)) is None:
        assert time.monotonic() < deadline, "batch counts never reached the status"
        time.sleep(0.01)
    return found


def test_batch_counts_start_afresh_with_each_instance() -> None:
    with fleet.testing.TestClient(Batcher.bind()) as client:
        first = _four_calls(client)
    with fleet.testing.TestClient(Batcher.bind()) as client:
        second = _four_calls(client)
    assert first["calls"] == second["calls"] == 4
    assert first["batches"] == second["batches"] == 1


def test_a_batched_function_reports_its_batches() -> None:
    with fleet.testing.TestClient(batched.bind()) as client:
        found = _four_calls(client, "batched", "batched")
    assert found["calls"] == 4 and found["batches"] == 1


def test_graph_nodes_are_numbered_per_graph() -> None:
    @fleet.deployment
    class Model:
        def f(self, x: int) -> int:
            return x

    app = Model.bind()
    with dag.InputNode() as inp:
        shared = app.f.bind(inp)
        first = dag.encode([shared, app.f.bind(shared)])
    with dag.InputNode() as inp:
        second = dag.encode([app.f.bind(inp), app.f.bind(app.f.bind(inp))])
    ids = [item["id"] for item in first["items"]]
    assert ids == [1, 2] and first["items"][1]["args"][0]["id"] == 1   # shared: one id
    assert [item["id"] for item in second["items"]] == [1, 2]          # not 3, 4


def test_the_runtime_starts_an_instance_only_through_the_registered_starter(
        monkeypatch) -> None:
    from fleet import _api, _runtime
    assert _runtime._starter is _api.start          # fleet's public layer registered it
    monkeypatch.setattr(_runtime, "_current", None)
    monkeypatch.setattr(_runtime, "_starter", None)
    with pytest.raises(fleet.FleetError, match="call fleet.start"):
        _runtime.current()
    started: list[bool] = []

    def start() -> None:
        started.append(True)
        _runtime._current = sentinel                 # what a real start would set

    sentinel: Any = object()
    _runtime.set_starter(start)
    assert _runtime.current() is sentinel and started == [True]


@fleet.deployment
class Inner:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __call__(self) -> str:
        return self.tag


@fleet.deployment
class Outer:
    def __init__(self, inner: fleet.DeploymentHandle) -> None:
        self.inner = inner

    async def __call__(self) -> str:
        return f"outer of {await self.inner.remote()}"


async def _call_outer() -> str:
    return str(await fleet.DeploymentHandle("Outer", "app").remote())


def test_two_instances_side_by_side_each_reach_their_own_replicas() -> None:
    from helpers import MemoryInstance
    fleet.shutdown()
    first = MemoryInstance().start()
    second: MemoryInstance | None = None
    try:
        fleet.run(Outer.bind(Inner.bind("first")), name="app", route_prefix=None)
        second = MemoryInstance().start()      # the process's instance from now on
        fleet.run(Outer.bind(Inner.bind("second")), name="app", route_prefix=None)
        # code on each instance's loop (its replicas' handles included) reaches its own
        assert first.call(_call_outer()) == "outer of first"
        assert second.call(_call_outer()) == "outer of second"
        assert fleet.DeploymentHandle("Outer", "app").remote().result(timeout_s=30) == \
            "outer of second"
        second.shutdown()
        # the first goes on alone, and is the process's again (nothing new is started)
        assert fleet.DeploymentHandle("Outer", "app").remote().result(timeout_s=30) == \
            "outer of first"
        assert first.call(_call_outer()) == "outer of first"
    finally:
        if second is not None:
            second.shutdown()
        first.shutdown()
    from fleet import _runtime
    assert not _runtime._bound and _runtime._current is None


_caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")


@fleet.multiplexed(max_num_models_per_replica=3)
async def load_model(model_id: str) -> str:
    return f"{model_id} loaded by {_caller.get()}"


@fleet.deployment(num_replicas=2, health_check_period_s=0.05)
class FreeLoader:
    """Its loader is a plain function: several replicas in one process must not share
    that loader's cache, nor tell each other's callers what they hold."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex[:8]

    async def __call__(self, x: int) -> tuple[str, str]:
        _caller.set(self.token)
        return self.token, await load_model(fleet.get_multiplexed_model_id())


def test_replicas_in_one_process_keep_their_own_models(memory_instance) -> None:
    handle = fleet.run(FreeLoader.bind(), name="models", route_prefix=None)
    answers = [handle.options(multiplexed_model_id=mid).remote(1).result(timeout_s=30)
               for mid in ("a", "b", "a", "b", "a", "c", "a", "b")]
    # every model a replica answered with is one it loaded itself
    for token, model in answers:
        assert model.endswith(f"loaded by {token}"), answers

    def held() -> list[str]:
        reps = fleet.status()["applications"]["models"]["deployments"]["FreeLoader"]
        return sorted(m["model_id"] for r in reps["replicas"] for m in r.get("models") or [])

    # status lists what each replica loaded, once per replica that holds it
    loaded = sorted({(token, model.split()[0]) for token, model in answers})
    wait_for(lambda: held() == sorted(m for _, m in loaded), 10)


def test_a_plain_function_loader_keeps_one_cache_per_replica_scope() -> None:
    from fleet import _multiplex
    loads: list[str] = []

    @fleet.multiplexed(max_num_models_per_replica=2)
    async def loader(model_id: str) -> str:
        loads.append(model_id)
        return model_id

    changes: list[str] = []
    first = _multiplex.ModelScope(lambda: changes.append("first"))
    second = _multiplex.ModelScope(lambda: changes.append("second"))

    async def call(scope: _multiplex.ModelScope, model_id: str) -> str:
        _multiplex.enter_call(model_id, scope)      # what a replica does for a model call
        return str(await loader(model_id))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_task(call(first, "a"))
        await loop.create_task(call(second, "a"))    # loads again: not the first's model
        await loop.create_task(call(first, "a"))     # held
    asyncio.run(main())
    assert loads == ["a", "a"] and changes == ["first", "second"]
    assert first.held_ids() == ["a"] and second.held_ids() == ["a"]
    first.close()
    assert first.held_ids() == [] and second.held_ids() == ["a"]


def test_a_class_with_a_loader_defined_in_a_function_travels_by_value(
        memory_instance) -> None:
    # pickled by value with its loader's closure: what that closure reaches must pickle
    @fleet.deployment
    class Local:
        @fleet.multiplexed(max_num_models_per_replica=1)
        async def get_model(self, model_id: str) -> str:
            return model_id.upper()

        async def __call__(self, x: int) -> str:
            return await self.get_model(fleet.get_multiplexed_model_id())

    handle = fleet.run(Local.bind(), name="local", route_prefix=None)
    assert handle.options(multiplexed_model_id="a").remote(1).result(timeout_s=30) == "A"
