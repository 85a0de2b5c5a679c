"""Handle calls from a driver's own event loop (an ``asyncio.run`` script) go through a
runtime of that loop (a satellite, fleet/_runtime.py ``for_caller``): no thread crossing
per call, and nothing left behind when the loop shuts down. Real replicas, real
connections."""

from __future__ import annotations

import asyncio
import threading
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
