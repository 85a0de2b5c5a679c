"""@fleet.batch on the memory backend (HTTP through the proxy's app): grouping,
timeouts, errors, cancellation, HTTP method calls, streaming, and batch sizes in
status. The example script runs it for real."""

from __future__ import annotations

import asyncio
import time

import pytest

import fleet


@fleet.deployment(max_ongoing_requests=32, health_check_period_s=0.2)
class Doubler:
    def __init__(self) -> None:
        self.arrived: list[int] = []
        self.cancelled: list[int] = []
        self.batches: list[list[int]] = []

    @fleet.batch(max_batch_size=4, batch_wait_timeout_s=30)
    async def full_only(self, items: list[int]) -> list[tuple[int, int]]:
        return [(x * 2, len(items)) for x in items]

    # a second: the three calls of the partial-batch test arrive within it even when a
    # loaded machine pauses the caller between them
    @fleet.batch(max_batch_size=8, batch_wait_timeout_s=1.0)
    async def __call__(self, items: list[int]) -> list[tuple[int, int]]:
        return [(x * 2, len(items)) for x in items]

    @fleet.batch(max_batch_size=8, batch_wait_timeout_s=0.2)
    async def boom(self, items: list[int]) -> list[int]:
        raise ValueError(f"bad batch of {len(items)}")

    @fleet.batch(max_batch_size=8, batch_wait_timeout_s=0.2)
    async def short(self, items: list[int]) -> list[int]:
        return items[:-1]

    @fleet.batch(max_batch_size=2, batch_wait_timeout_s=30)
    async def _pairs(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        return items

    async def pairs(self, x: int) -> int:
        # Records arrival and cancellation around the batched call, so the test can
        # see that a cancelled caller left the batch before it ran.
        self.arrived.append(x)
        try:
            return await self._pairs(x)
        except asyncio.CancelledError:
            self.cancelled.append(x)
            raise

    async def seen(self) -> dict[str, list]:
        return {"arrived": self.arrived, "cancelled": self.cancelled,
                "batches": self.batches}

    @fleet.batch(max_batch_size=4, batch_wait_timeout_s=30)
    async def predict(self, requests: list) -> list[dict]:
        bodies = [await r.json() for r in requests]
        return [{"y": b["x"] * 10, "batch": len(requests)} for b in bodies]

    @fleet.batch(max_batch_size=4, batch_wait_timeout_s=30)
    async def words(self, requests: list):
        names = [r.query_params["name"] for r in requests]
        for i in range(3):
            yield [f"{n}{i}/{len(names)};" for n in names]

    @fleet.batch(max_batch_size=4, batch_wait_timeout_s=30)
    async def tokens(self, prompts: list[str]):
        for i in range(3):
            yield [f"{p}-{i}-{len(prompts)}" for p in prompts]


@fleet.deployment(max_ongoing_requests=32)
class Gated:
    """Batches that hold until the gate opens, recording whether it was open at their
    start: a batch that started while the gate was shut ran alongside the first."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.arrived = 0
        self.started: list[tuple[list[int], bool]] = []

    async def _record(self, items: list[int]) -> list[int]:
        self.started.append((list(items), self.gate.is_set()))
        await self.gate.wait()
        return items

    @fleet.batch(max_batch_size=2, batch_wait_timeout_s=0, max_concurrent_batches=1)
    async def _serial(self, items: list[int]) -> list[int]:
        return await self._record(items)

    @fleet.batch(max_batch_size=2, batch_wait_timeout_s=0, max_concurrent_batches=2)
    async def _parallel(self, items: list[int]) -> list[int]:
        return await self._record(items)

    async def call(self, method: str, x: int) -> int:
        self.arrived += 1
        return await getattr(self, method)(x)

    async def state(self) -> tuple[int, list]:
        return self.arrived, self.started

    async def open(self) -> None:
        self.gate.set()


@pytest.mark.parametrize("method,concurrent", [("_serial", 1), ("_parallel", 2)])
def test_at_most_max_concurrent_batches_run_at_once(shared_memory_instance, method, concurrent):
    handle = fleet.run(Gated.bind(), name=f"gated{concurrent}", route_prefix=None)
    calls = [handle.call.remote(method, 0), handle.call.remote(method, 1)]
    _wait_for(lambda: handle.state.remote().result()[1])    # the first batch runs
    calls += [handle.call.remote(method, x) for x in (2, 3, 4)]
    _wait_for(lambda: handle.state.remote().result()[0] == 5)
    # the running batches: exactly max_concurrent_batches, then no more
    _wait_for(lambda: len(handle.state.remote().result()[1]) == concurrent)
    handle.open.remote().result()
    assert [c.result(timeout_s=10) for c in calls] == [0, 1, 2, 3, 4]
    started = handle.state.remote().result()[1]
    # how the later calls group depends on when they arrive; what must hold is that
    # exactly max_concurrent_batches batches started while the gate was shut
    flags = [open_ for _, open_ in started]
    assert flags[:concurrent] == [False] * concurrent and all(flags[concurrent:]), flags
    assert sorted(x for items, _ in started for x in items) == [0, 1, 2, 3, 4]
    fleet.delete(f"gated{concurrent}")


@pytest.fixture(scope="module")
def doubler(shared_memory_instance):
    handle = fleet.run(Doubler.bind(), name="batching", route_prefix="/batch")
    yield handle, shared_memory_instance


def test_batch_runs_as_soon_as_it_is_full(doubler) -> None:
    handle, _ = doubler
    started = time.monotonic()
    responses = [handle.full_only.remote(i) for i in range(4)]
    assert [r.result(timeout_s=10) for r in responses] == [(i * 2, 4) for i in range(4)]
    assert time.monotonic() - started < 10       # far below batch_wait_timeout_s=30


def test_partial_batch_runs_after_the_wait_timeout_and_each_caller_gets_its_element(
        doubler) -> None:
    handle, _ = doubler
    started = time.monotonic()
    responses = [handle.remote(i) for i in range(3)]
    results = [r.result(timeout_s=10) for r in responses]
    assert [v for v, _ in results] == [0, 2, 4]
    assert sum(1 for _, size in results if size > 1) >= 2   # grouped
    assert time.monotonic() - started >= 1.0 - 0.05     # waited for the timeout


def test_exception_fails_every_call_of_the_batch(doubler) -> None:
    handle, _ = doubler
    responses = [handle.boom.remote(i) for i in range(3)]
    for r in responses:
        with pytest.raises(ValueError, match="bad batch of"):
            r.result(timeout_s=10)


def test_wrong_length_result_fails_every_caller_with_both_lengths(doubler) -> None:
    handle, _ = doubler
    responses = [handle.short.remote(i) for i in range(3)]
    messages = []
    for r in responses:
        with pytest.raises(ValueError) as info:
            r.result(timeout_s=10)
        messages.append(str(info.value))
    # how the three calls group depends on when they arrive: each caller's message names
    # its own batch's two lengths
    for m in messages:
        n = int(m.split("batch of ")[1].split()[0])
        assert n >= 1 and f"returned {n - 1} results for a batch of {n} calls" in m, m


def _wait_for(cond, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_cancelled_caller_is_taken_out_of_a_batch_not_yet_started(doubler) -> None:
    handle, _ = doubler
    first = handle.pairs.remote(100)
    _wait_for(lambda: 100 in handle.seen.remote().result()["arrived"])
    first.cancel()
    _wait_for(lambda: 100 in handle.seen.remote().result()["cancelled"])
    second, third = handle.pairs.remote(101), handle.pairs.remote(102)
    assert second.result(timeout_s=10) == 101
    assert third.result(timeout_s=10) == 102
    assert handle.seen.remote().result()["batches"] == [[101, 102]]


def test_batched_method_reached_by_http_method_header(doubler) -> None:
    _, inst = doubler

    async def go() -> list[dict]:
        async with inst.async_http() as client:
            rs = await asyncio.gather(*[
                client.post("/batch", json={"x": i},
                            headers={"X-SERVE-CALL-METHOD": "predict"}) for i in range(4)])
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.json() for r in rs]

    results = asyncio.run(go())
    assert [r["y"] for r in results] == [0, 10, 20, 30]
    assert all(r["batch"] == 4 for r in results)    # only a full batch runs before 30 s


def test_batched_async_generator_streams_each_http_client_its_element(doubler) -> None:
    _, inst = doubler

    async def go() -> list[str]:
        async with inst.async_http() as client:
            rs = await asyncio.gather(*[
                client.get("/batch", params={"name": n},
                           headers={"X-SERVE-CALL-METHOD": "words"}) for n in "abcd"])
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.text for r in rs]

    assert asyncio.run(go()) == [f"{n}0/4;{n}1/4;{n}2/4;" for n in "abcd"]


def test_batched_method_reached_by_method_name(doubler) -> None:
    handle, _ = doubler
    h = handle.options(method_name="full_only")
    responses = [h.remote(i) for i in range(4)]
    assert [r.result(timeout_s=10)[0] for r in responses] == [0, 2, 4, 6]


def test_batched_async_generator_streams_each_caller_its_element(doubler) -> None:
    handle, _ = doubler
    h = handle.options(method_name="tokens", stream=True)

    async def consume(prompt: str) -> list[str]:
        return [item async for item in h.remote(prompt)]

    async def go() -> list[list[str]]:
        return await asyncio.gather(*[consume(p) for p in "abcd"])

    streams = asyncio.run(go())
    assert streams == [[f"{p}-{i}-4" for i in range(3)] for p in "abcd"]


def test_batch_sizes_show_in_status(doubler) -> None:
    handle, _ = doubler
    responses = [handle.full_only.remote(i) for i in range(4)]
    for r in responses:
        r.result(timeout_s=10)

    def stats():
        dep = fleet.status()["applications"]["batching"]["deployments"]["Doubler"]
        return dep["replicas"][0]["batches"].get("Doubler.full_only")

    found = _wait_for(stats)
    assert found["largest_batch_size"] == 4
    assert found["batch_sizes"].get(4, 0) >= 1


def test_batch_rejects_sync_functions_and_bad_sizes() -> None:
    with pytest.raises(TypeError, match="async def"):
        fleet.batch(lambda items: items)
    with pytest.raises(ValueError, match="max_batch_size"):
        fleet.batch(max_batch_size=0)


def test_serving_batching_example_runs() -> None:
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "serving_batching.py")],
                         capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "largest batch:" in out.stdout
