"""Handle calls from a driver's own event loop (an ``asyncio.run`` script) go through a
runtime of that loop (a satellite, fleet/_runtime.py ``for_caller``): no thread crossing
per call, and nothing left behind when the loop shuts down. Real replicas, real
connections."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psutil
import pytest

import fleet
from fleet import _runtime
from fleet.exceptions import FleetError


@fleet.deployment
class Echo:
    async def __call__(self, x: Any) -> Any:
        return x

    async def numbers(self, n: int) -> Any:
        for i in range(n):
            yield i


@fleet.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 2,
                                      "target_ongoing_requests": 50,
                                      "look_back_period_s": 30})
class Held:
    async def __call__(self, gate: float) -> str:
        await asyncio.sleep(gate)
        return "held"


def _satellite() -> _runtime.Runtime:
    return _runtime.for_caller(_runtime.current())


@pytest.mark.both_backends
def test_an_async_caller_calls_from_its_own_loop(shared_instance) -> None:
    handle = fleet.run(Echo.bind(), name="sat", route_prefix="/sat")

    async def main() -> tuple[list[Any], list[Any], _runtime.Runtime]:
        loop = asyncio.get_running_loop()
        sat = _satellite()
        assert sat.loop is loop and sat.parent is _runtime.current()
        response = handle.remote("first")
        assert response._task is not None and response._loop is loop   # runs here
        values = await asyncio.gather(response, *(handle.remote(i) for i in range(100)))
        streamed = [i async for i in handle.options(method_name="numbers",
                                                    stream=True).remote(3)]
        assert _satellite() is sat                  # one per loop, kept between calls
        return values, streamed, sat

    values, streamed, sat = asyncio.run(main())
    assert values == ["first", *range(100)]
    assert streamed == [0, 1, 2]
    # the loop shut down: its satellite retired and closed its connections
    assert sat.retired
    assert sat.controller is not None and sat.controller.transport.is_closing()


def test_loops_that_come_and_go_leave_no_connection_open(shared_instance) -> None:
    handle = fleet.run(Echo.bind(), name="sat-fds", route_prefix="/sat-fds")

    async def calls() -> list[int]:
        return list(await asyncio.gather(*(handle.remote(i) for i in range(20))))

    assert asyncio.run(calls()) == list(range(20))
    me = psutil.Process()
    before = me.num_fds()
    for _ in range(15):
        assert asyncio.run(calls()) == list(range(20))
    # each loop's satellite opened a controller and a replica connection, and closed them
    assert me.num_fds() <= before + 2


def test_a_call_left_behind_by_a_closed_loop_says_so(shared_instance) -> None:
    handle = fleet.run(Echo.bind(), name="sat-left", route_prefix="/sat-left")

    async def start_and_leave() -> tuple[Any, Any]:
        done = handle.remote("finished")
        await done
        return done, handle.remote("left")      # never awaited on its loop

    done, left = asyncio.run(start_and_leave())
    assert done.result() == "finished"          # a finished call keeps its value
    with pytest.raises(fleet.RequestCancelledError, match="event loop that started it"):
        left.result(5)


def test_blocking_code_on_a_running_loop_still_gets_its_result(shared_instance) -> None:
    # a notebook cell runs on a loop and may call .result() or iterate a stream without
    # awaiting: the call has not started on that loop, so the instance's runtime takes it
    handle = fleet.run(Echo.bind(), name="sat-cell", route_prefix="/sat-cell")

    async def cell() -> tuple[Any, list[int]]:
        value = handle.remote("cell").result(30)
        items = list(handle.options(method_name="numbers", stream=True).remote(3))
        return value, items

    assert asyncio.run(cell()) == ("cell", [0, 1, 2])

    async def started_then_blocked() -> None:
        response = handle.remote("x")
        await asyncio.sleep(0.05)       # it runs on this loop now: blocking would hang it
        with pytest.raises(RuntimeError, match="use `await response`"):
            response.result(1)
        assert await response == "x"

    asyncio.run(started_then_blocked())


def test_a_new_loops_first_call_sees_the_tables(shared_instance) -> None:
    fleet.run(Echo.bind(), name="sat-first", route_prefix="/sat-first")

    async def first() -> None:
        with pytest.raises(FleetError, match="has no deployment named 'Nope'"):
            # (made directly: get_deployment_handle would check the name itself)
            await fleet.DeploymentHandle("Nope", "sat-first").remote(1)

    asyncio.run(first())


def test_a_gone_loops_load_leaves_the_autoscaler(shared_instance) -> None:
    handle = fleet.run(Held.bind(), name="sat-load", route_prefix="/sat-load")

    def callers() -> int:
        dep = fleet.status()["applications"]["sat-load"]["deployments"]["Held"]
        return int(dep["autoscaling"]["callers"])

    async def hold() -> int:
        calls = [asyncio.ensure_future(handle.remote(1.5)) for _ in range(5)]
        deadline = time.monotonic() + 30
        while callers() == 0:           # the satellite reported its five calls
            assert time.monotonic() < deadline, "no load report arrived"
            await asyncio.sleep(0.05)
        seen = callers()
        await asyncio.gather(*calls)
        return seen

    assert asyncio.run(hold()) == 1
    # the loop shut down: its satellite's samples left with its connection, not after
    # look_back_period_s (30 s)
    deadline = time.monotonic() + 10
    while callers() != 0:
        assert time.monotonic() < deadline, "the gone caller's load is still counted"
        time.sleep(0.05)


def test_sync_callers_and_the_instance_loop_use_the_instance_runtime(shared_instance) -> None:
    handle = fleet.run(Echo.bind(), name="sat-sync", route_prefix="/sat-sync")
    rt = _runtime.current()
    assert handle.remote(5).result() == 5          # no loop here: the instance's runtime
    assert _runtime.for_caller(rt) is rt
    seen: list[Any] = []
    done = threading.Event()
    rt.loop.call_soon_threadsafe(lambda: (seen.append(_runtime.for_caller(rt)), done.set()))
    assert done.wait(10) and seen == [rt]          # on the instance's own loop: itself


# last: the instance fixture stops the module's shared one
def test_a_satellite_whose_instance_stops_fails_calls_at_once(instance) -> None:
    handle = fleet.run(Echo.bind(), name="sat-stop", route_prefix="/sat-stop")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        async def call(x: Any) -> Any:
            return await handle.remote(x)

        assert asyncio.run_coroutine_threadsafe(call(1), loop).result(30) == 1
        async def satellite() -> _runtime.Runtime:
            return _satellite()

        sat = asyncio.run_coroutine_threadsafe(satellite(), loop).result(30)
        fleet.shutdown()
        # the satellite heard its controller go: a call now fails, it does not wait
        with pytest.raises(FleetError):
            asyncio.run_coroutine_threadsafe(call(2), loop).result(30)
        assert sat.retired
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
