"""The detached controller's checkpoint (fleet/_controller/checkpoint.py) in memory: what
a snapshot of a real controller holds survives pickling and comes back in a new
controller, with the replicas the backend still has adopted and routed at once, and an
adopted replica that never reconnects replaced. The Ray test (tests/test_ray_detached.py)
kills a real controller actor."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import cloudpickle

import fleet
import fleet.testing
from fleet._controller import checkpoint
from fleet._controller.controller import Controller
from fleet._deployment import build_plans
from fleet._types import ReplicaState, deployment_key


@fleet.deployment(num_replicas=2)
class Model:
    def __init__(self, tag: str = "v1") -> None:
        self.tag = tag

    def __call__(self, x: int) -> str:
        return f"{self.tag}:{x}"


class Kept:
    """A replica's process as a backend that adopted it tracks it."""

    def __init__(self, key: str) -> None:
        self.key = key

    def exit_code(self) -> int | None:
        return None                 # still running


class Backend:
    """What _check_replicas asks of a backend: every adopted process lives on."""

    def __init__(self) -> None:
        self.killed: list[Kept] = []

    def alive(self, proc: Kept) -> bool:
        return True

    def kill(self, proc: Kept) -> None:
        self.killed.append(proc)

    def nodes(self) -> list[dict[str, Any]]:
        return []


def _until(cond: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)
    return value


def _saved() -> tuple[dict[str, Any], set[str]]:
    """A snapshot of a controller serving two applications, one scaled by hand, with a
    traffic split; pickled and read back as the GCS store would."""
    with fleet.testing.TestClient(Model.bind()) as client:
        inst = client._session.instance
        assert inst is not None and inst.runtime is not None and inst.controller is not None

        def ctl(method: str, *args: Any) -> Any:
            return inst.call(inst.runtime.call_controller(method, *args))
        ctl("deploy", "b", "/b", build_plans(Model.options(num_replicas=1).bind("v2"), "b"),
            "http", None)
        ctl("wait_ready", "b")
        ctl("scale", "default", "Model", 3)

        def running() -> set[str]:
            reps = ctl("status")["applications"]["default"]["deployments"]["Model"]["replicas"]
            return {r["replica_id"] for r in reps if r["state"] == "RUNNING"}
        ids = _until(lambda: len(r := running()) == 3 and r)
        ctl("set_traffic", "/", {"default": 3, "b": 1})
        controller = inst.controller

        async def snap() -> dict[str, Any]:
            return checkpoint.snapshot(controller)
        state = inst.call(snap())
    return cloudpickle.loads(cloudpickle.dumps(state)), ids


def test_a_checkpoint_brings_back_applications_and_adopts_the_live_replicas() -> None:
    state, ids = _saved()
    gone = sorted(ids)[0]                     # its actor died with the controller
    asked: list[tuple[str, str]] = []

    def adopt(rid: str, group: str) -> Kept | None:
        asked.append((rid, group))
        return None if rid == gone else Kept(rid)
    fresh = Controller(Backend(), b"s" * 32, "tcp:127.0.0.1:1", [], "")  # type: ignore[arg-type]
    adopted = checkpoint.restore(fresh, state, adopt)
    assert set(adopted) == ids - {gone} | {r for r, g in asked if g.startswith("b")}
    assert {r for r, g in asked if g == deployment_key("default", "Model")} == ids
    dep = fresh.apps["default"].deployments["Model"]
    assert dep.target == 3                                   # the count set by hand
    assert set(dep.replicas) == ids - {gone}
    for rec in dep.replicas.values():
        assert rec.state == ReplicaState.RUNNING and rec.address and rec.conn is None
        assert rec.rejoin_by > time.monotonic()
    assert fresh.apps["b"].route_prefix == "/b"
    assert fresh.version > state["version"]
    assert fresh.traffic == state["traffic"] and fresh.traffic
    assert [r["revision"] for r in fresh.revisions.list("default")] == \
        [r["revision"] for r in state["revisions"].list("default")]
    # routed at once, before any replica reconnected: requests keep flowing
    table = fresh.tables()["deployments"][deployment_key("default", "Model")]
    assert {r["replica_id"] for r in table["replicas"]} == ids - {gone}


def test_an_adopted_replica_that_does_not_reconnect_in_time_is_replaced() -> None:
    state, ids = _saved()
    backend = Backend()
    fresh = Controller(backend, b"s" * 32, "tcp:127.0.0.1:1", [], "")  # type: ignore[arg-type]
    checkpoint.restore(fresh, state, lambda rid, group: Kept(rid))
    dep = fresh.apps["default"].deployments["Model"]
    late = sorted(dep.replicas)[0]
    dep.replicas[late].rejoin_by = time.monotonic() - 1      # its 30 s are over

    async def check() -> None:
        fresh._check_replicas(dep, time.monotonic())
    asyncio.run(check())
    assert late not in dep.replicas
    assert [p.key for p in backend.killed] == [late]
    assert dep.replaced[-1]["replica_id"] == late
    assert "did not reconnect" in dep.replaced[-1]["reason"]
    assert len(dep.replicas) == 2                            # the others wait on
