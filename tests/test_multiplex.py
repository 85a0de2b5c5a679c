"""Model multiplexing against real replicas: the model id from handles, HTTP headers and
gRPC metadata, the per-replica LRU, one load for concurrent requests, routing that
keeps models where they are loaded, batches of one model, memory budgets, status; and
the Router's model choice on its own."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from helpers import http_port, replicas, wait_for
from protos import fleet_echo_pb2 as pb
from starlette.requests import Request

import fleet
from fleet import _runtime
from fleet._router import Router

SERVICER_FN = "protos.fleet_echo_pb2_grpc.add_EchoServiceServicer_to_server"

# Models dropped in this replica process (their __del__ ran).
DELETED: list[str] = []


class Model:
    def __init__(self, model_id: str, size: int = 0) -> None:
        self.model_id = model_id
        # touched memory, so the replica's resident size grows by about `size`
        self.weights = bytearray(b"\x01") * size

    def predict(self, x: int) -> str:
        return f"{self.model_id}:{x}"

    def __del__(self) -> None:
        DELETED.append(self.model_id)


@fleet.deployment(num_replicas=2, max_ongoing_requests=16, health_check_period_s=0.2)
class Pool:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.waiting = 0
        self.gate = asyncio.Event()
        self.gate.set()

    @fleet.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Model:
        self.loads.append(model_id)
        if model_id.startswith("bad"):
            raise KeyError(f"no model named {model_id!r}")
        await self.gate.wait()
        return Model(model_id)

    async def __call__(self, x: int) -> dict[str, Any]:
        self.waiting += 1
        try:
            model = await self.get_model(fleet.get_multiplexed_model_id())
        finally:
            self.waiting -= 1
        return {"out": model.predict(x), "pid": os.getpid(), "loads": len(self.loads)}

    async def close_gate(self) -> None:
        self.gate.clear()

    async def open_gate(self) -> None:
        self.gate.set()

    async def state(self) -> dict[str, Any]:
        return {"waiting": self.waiting, "loads": list(self.loads), "deleted": list(DELETED)}


class AsyncModel:
    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    async def __del__(self) -> None:            # awaited by fleet when evicted
        await asyncio.sleep(0)
        DELETED.append(f"async {self.model_id}")


@fleet.deployment
class AsyncPool:
    @fleet.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str) -> AsyncModel:
        return AsyncModel(model_id)

    async def __call__(self, x: int) -> str:
        return (await self.get_model(fleet.get_multiplexed_model_id())).model_id

    async def deleted(self) -> list[str]:
        return list(DELETED)


@fleet.deployment(max_ongoing_requests=16)
class Batched:
    @fleet.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
    async def __call__(self, xs: list[int]) -> list[tuple[str, int, int]]:
        model_id = fleet.get_multiplexed_model_id()
        return [(model_id, x, len(xs)) for x in xs]


@fleet.deployment
class Big:
    @fleet.multiplexed(max_num_models_per_replica=10, max_model_memory_bytes=60_000_000)
    async def get_model(self, model_id: str) -> Model:
        return Model(model_id, size=40_000_000)

    async def __call__(self, x: int) -> str:
        return (await self.get_model(fleet.get_multiplexed_model_id())).predict(x)


@fleet.deployment
class Web:
    def __init__(self) -> None:
        self.loads = 0

    @fleet.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Model:
        self.loads += 1
        return Model(model_id)

    async def __call__(self, request: Request) -> dict[str, Any]:
        model = await self.get_model(fleet.get_multiplexed_model_id())
        return {"model": model.model_id, "pid": os.getpid(), "loads": self.loads}

    async def Say(self, request: Any, context: Any) -> Any:  # noqa: N802 - the RPC's name
        model = await self.get_model(fleet.get_multiplexed_model_id())
        return pb.EchoReply(text=model.predict(request.count))


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    fleet.shutdown()
    fleet.start(http_options={"host": "127.0.0.1", "port": 0},
                grpc_options={"port": 0, "grpc_servicer_functions": [SERVICER_FN]})
    try:
        proxies = fleet.status()["proxies"]
        yield proxies["http"]["port"], proxies["grpc"]["port"]
    finally:
        fleet.shutdown()


def _call(handle: Any, model_id: str, x: int = 1) -> dict[str, Any]:
    return handle.options(multiplexed_model_id=model_id).remote(x).result(timeout_s=30)


def test_requests_stick_to_replicas_holding_their_model(ports: Any) -> None:
    handle = fleet.run(Pool.bind(), name="sticky", route_prefix=None)
    ids = ["m0", "m1", "m2", "m3"]       # more models than one replica holds (2)
    loads: dict[int, int] = {}
    for i in range(24):
        mid = ids[i % 4]
        got = _call(handle, mid, i)
        assert got["out"] == f"{mid}:{i}"
        loads[got["pid"]] = max(loads.get(got["pid"], 0), got["loads"])
    # Each model loaded once, on one replica: no thrashing between the two.
    assert sum(loads.values()) == 4
    assert len(loads) == 2


def test_concurrent_requests_for_one_model_load_it_once(ports: Any) -> None:
    handle = fleet.run(Pool.options(num_replicas=1).bind(), name="once", route_prefix=None)
    handle.close_gate.remote().result(timeout_s=10)
    calls = [handle.options(multiplexed_model_id="shared").remote(i) for i in range(6)]
    # every call is inside the loader's wait before the load may finish
    wait_for(lambda: handle.state.remote().result(timeout_s=10)["waiting"] == 6)
    handle.open_gate.remote().result(timeout_s=10)
    outs = [c.result(timeout_s=30) for c in calls]
    assert sorted(o["out"] for o in outs) == sorted(f"shared:{i}" for i in range(6))
    assert handle.state.remote().result(timeout_s=10)["loads"] == ["shared"]


def test_a_burst_for_a_new_model_loads_it_on_one_replica(ports: Any) -> None:
    handle = fleet.run(Pool.bind(), name="burst", route_prefix=None)
    calls = [handle.options(multiplexed_model_id="hot").remote(i) for i in range(16)]
    outs = [c.result(timeout_s=30) for c in calls]
    assert len({o["pid"] for o in outs}) == 1
    assert max(o["loads"] for o in outs) == 1


def test_lru_evicts_and_runs_del_and_status_shows_models(ports: Any) -> None:
    handle = fleet.run(Pool.options(num_replicas=1).bind(), name="lru", route_prefix=None)
    for mid in ("a", "b", "a", "c"):     # "b" is the least recently used when "c" loads
        _call(handle, mid)
    state = handle.state.remote().result(timeout_s=10)
    assert state["loads"] == ["a", "b", "c"]
    assert state["deleted"] == ["b"]
    held = wait_for(lambda: replicas("lru", "Pool")[0].get("models"))
    assert [m["model_id"] for m in held] == ["a", "c"]
    assert all(m["load_s"] >= 0 and m["loaded_at"] and m["loader"].endswith("get_model")
               for m in held)


def test_an_async_del_of_an_evicted_model_is_awaited(ports: Any) -> None:
    handle = fleet.run(AsyncPool.bind(), name="asyncdel", route_prefix=None)
    assert _call(handle, "x") == "x"
    assert _call(handle, "y") == "y"          # evicts "x" (one model per replica)
    assert wait_for(lambda: handle.deleted.remote().result(timeout_s=10)) == ["async x"]


def test_a_failing_loader_fails_the_call_only_and_is_not_cached(ports: Any) -> None:
    handle = fleet.run(Pool.options(num_replicas=1).bind(), name="failing", route_prefix=None)
    for _ in range(2):
        with pytest.raises(KeyError, match="bad1"):
            _call(handle, "bad1")
    assert _call(handle, "good")["out"] == "good:1"
    assert handle.state.remote().result(timeout_s=10)["loads"] == ["bad1", "bad1", "good"]


def test_a_call_without_a_model_id_says_how_to_send_one(ports: Any) -> None:
    handle = fleet.run(Pool.options(num_replicas=1).bind(), name="noid", route_prefix=None)
    with pytest.raises(ValueError, match="serve_multiplexed_model_id"):
        handle.remote(1).result(timeout_s=10)


def test_a_batch_holds_one_models_calls(ports: Any) -> None:
    handle = fleet.run(Batched.bind(), name="batched", route_prefix=None)
    calls = [(mid, x, handle.options(multiplexed_model_id=mid).remote(x))
             for x in range(12) for mid in ("a", "b")]
    for mid, x, call in calls:
        got_model, got_x, size = call.result(timeout_s=30)
        assert (got_model, got_x) == (mid, x)
        assert 1 <= size <= 8
    # and calls with no model id still batch
    assert handle.remote(5).result(timeout_s=30)[:2] == ("", 5)


def test_memory_budget_evicts_by_resident_size(ports: Any) -> None:
    handle = fleet.run(Big.bind(), name="big", route_prefix=None)
    assert _call(handle, "one") == "one:1"
    assert _call(handle, "two") == "two:1"
    held = wait_for(lambda: [m for m in replicas("big", "Big")[0].get("models", [])
                             if m["model_id"] == "two"] and replicas("big", "Big")[0]["models"])
    assert [m["model_id"] for m in held] == ["two"]
    assert held[0]["bytes"] >= 30_000_000


def test_model_id_from_http_header_with_underscores_or_dashes(ports: Any) -> None:
    http_port, _ = ports
    fleet.run(Web.bind(), name="web", route_prefix="/web")
    url = f"http://127.0.0.1:{http_port}/web"
    for header in ("serve_multiplexed_model_id", "serve-multiplexed-model-id"):
        r = httpx.post(url, headers={header: f"via-{header[5]}"}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == f"via-{header[5]}"
    r = httpx.post(url, timeout=30)
    assert r.status_code == 500          # the reason is in the log and in fleet status
    assert r.json()["request_id"] == r.headers["x-request-id"]
    last = fleet.status()["applications"]["web"]["deployments"]["Web"]["last_error"]
    assert "serve_multiplexed_model_id" in last["error"]


def test_a_new_caller_finds_the_holders_in_the_tables(ports: Any) -> None:
    http_port, _ = ports
    fleet.run(Web.options(num_replicas=2).bind(), name="tables", route_prefix="/tables")
    where = {}
    for mid in ("t0", "t1", "t2"):     # loaded through the HTTP proxy's router
        r = httpx.post(f"http://127.0.0.1:{http_port}/tables",
                       headers={"serve_multiplexed_model_id": mid}, timeout=30)
        where[mid] = r.json()["pid"]

    def published() -> bool:
        table = _runtime.current().tables["deployments"]["tables#Web"]  # type: ignore
        return sorted(m for r in table["replicas"] for m in r.get("models", [])) == \
            ["t0", "t1", "t2"]
    wait_for(published)
    # The driver never called these replicas: it routes by what the tables say. Ask
    # first for a model of the second replica listed, where a caller that knew nothing
    # would send it (the first of two equally empty replicas).
    table = _runtime.current().tables["deployments"]["tables#Web"]  # type: ignore
    first = table["replicas"][1]["models"][0]
    handle = fleet.get_deployment_handle("Web", "tables")
    for mid in [first] + [m for m in ("t0", "t1", "t2") if m != first]:
        got = handle.options(multiplexed_model_id=mid).remote({}).result(timeout_s=30)
        assert got["pid"] == where[mid]
    loads = {}
    for mid in ("t0", "t1", "t2"):
        got = handle.options(multiplexed_model_id=mid).remote({}).result(timeout_s=30)
        loads[got["pid"]] = got["loads"]
    assert sum(loads.values()) == 3


def test_model_id_from_grpc_metadata(ports: Any) -> None:
    _, grpc_port = ports
    fleet.run(Web.bind(), name="webgrpc", route_prefix="/webgrpc")
    from protos import fleet_echo_pb2_grpc as pb_grpc
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.EchoServiceStub(channel)
        reply = stub.Say(pb.EchoRequest(count=7), timeout=30,
                         metadata=(("application", "webgrpc"), ("multiplexed_model_id", "g1")))
    assert reply.text == "g1:7"


# -- the Router's choice, without processes ------------------------------------------------


def _router(n: int, limit: int = 2) -> Router:
    async def connect(address: str, peer: str) -> Any:
        raise AssertionError("not used")
    router = Router("app#dep", connect)
    router.update({"replicas": [{"replica_id": f"r{i}", "address": f"unix:/r{i}"}
                                for i in range(n)],
                   "max_ongoing_requests": limit, "max_queued_requests": -1,
                   "status": "HEALTHY", "message": "", "legacy_refs": False,
                   "autoscaling": False})
    return router


def test_router_prefers_the_holder_then_the_emptiest_replica() -> None:
    async def go() -> None:
        router = _router(3)
        router.set_models("r1", ["x"])
        router.set_models("r0", ["y", "z"])
        assert (await router.acquire("x")).replica_id == "r1"
        # r2 holds nothing: a new model goes there, and it is taken to hold it now
        assert (await router.acquire("w")).replica_id == "r2"
        assert (await router.acquire("w")).replica_id == "r2"
        # r2 is full (limit 2): the next call for "w" falls back to the emptier of r0, r1
        assert (await router.acquire("w")).replica_id == "r1"
        # the replica's own report replaces the guess
        router.set_models("r2", [])
        assert "w" not in router._by_id["r2"].models
    asyncio.run(go())


def test_router_queued_model_call_goes_to_the_holder_that_frees_up() -> None:
    async def go() -> None:
        router = _router(2, limit=1)
        router.set_models("r0", ["x"])
        first = await router.acquire("x")
        other = await router.acquire("y")
        assert (first.replica_id, other.replica_id) == ("r0", "r1")
        waiting = asyncio.ensure_future(router.acquire("x"))
        await asyncio.sleep(0)
        assert not waiting.done()
        router.release(first)
        assert (await waiting).replica_id == "r0"
    asyncio.run(go())


def test_decorator_and_option_errors() -> None:
    with pytest.raises(TypeError, match="async def"):
        @fleet.multiplexed
        def load(self: Any, model_id: str) -> None: ...
    with pytest.raises(ValueError, match="max_num_models_per_replica"):
        fleet.multiplexed(max_num_models_per_replica=0)
    with pytest.raises(ValueError, match="max_model_memory_bytes"):
        fleet.multiplexed(max_model_memory_bytes=-1)
    with pytest.raises(TypeError, match="multiplexed_model_id must be a string"):
        fleet.DeploymentHandle("d", "a").options(multiplexed_model_id=3)  # type: ignore


def test_fleet_status_command_shows_the_models_each_replica_holds(tmp_path: Any) -> None:
    import signal
    import subprocess
    import sys

    import psutil

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TMPDIR=str(tmp_path))      # this instance's record, no other
    cmd = [sys.executable, "-m", "fleet"]
    proc = subprocess.Popen([*cmd, "run", "apps.multiplex_apps:app", "--app-dir", here,
                             "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=here, env=env,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        port = http_port(proc.stdout)
        for mid in ("alpha", "beta"):
            r = httpx.get(f"http://127.0.0.1:{port}/",
                          headers={"serve-multiplexed-model-id": mid}, timeout=30)
            assert r.text == mid.upper()

        def shown() -> str:
            out = subprocess.run([*cmd, "status"], capture_output=True, text=True, env=env,
                                 cwd=here, timeout=60).stdout
            return out if "model_id: beta" in out else ""
        out = wait_for(shown)
        assert "model_id: alpha" in out and "load_s:" in out and "loaded_at:" in out
    finally:
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive
