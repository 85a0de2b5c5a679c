"""Calls between loops in two threads (fleet/_crossing.py): one wake-up per burst each
way, results, errors and cancellation carried as run_coroutine_threadsafe and
wrap_future carry them. Real loops in real threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from fleet import _crossing


class _CountingLoop(asyncio.SelectorEventLoop):
    """A loop that counts how often other threads woke it."""

    wakeups = 0

    def call_soon_threadsafe(self, *args: Any, **kwargs: Any) -> Any:
        self.wakeups += 1
        return super().call_soon_threadsafe(*args, **kwargs)


@pytest.fixture
def other_loop() -> Iterator[_CountingLoop]:
    loop = _CountingLoop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


async def _fail() -> None:
    raise ValueError("bad input")


def test_a_burst_of_calls_wakes_the_other_loop_once(other_loop) -> None:
    held = threading.Event()
    release = threading.Event()

    def block() -> None:          # keeps the loop busy while the burst is posted
        held.set()
        release.wait(10)

    other_loop.call_soon_threadsafe(block)
    assert held.wait(10)
    before = other_loop.wakeups
    futures = [_crossing.submit(other_loop, _double(i)) for i in range(200)]
    assert other_loop.wakeups - before == 1
    release.set()
    assert [f.result(10) for f in futures] == [2 * i for i in range(200)]


def test_errors_and_results_come_back_on_the_callers_loop(other_loop) -> None:
    async def caller() -> tuple[list[int], str]:
        here = asyncio.get_running_loop()
        values = await asyncio.gather(*[
            _crossing.wrap(_crossing.submit(other_loop, _double(i)), here)
            for i in range(50)])
        with pytest.raises(ValueError, match="bad input") as info:
            await _crossing.wrap(_crossing.submit(other_loop, _fail()), here)
        return list(values), str(info.value)

    values, error = asyncio.run(caller())
    assert values == [2 * i for i in range(50)] and error == "bad input"


def test_cancelling_either_side_cancels_the_task(other_loop) -> None:
    started = threading.Semaphore(0)
    cancelled = threading.Semaphore(0)

    async def forever() -> None:
        started.release()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.release()
            raise

    cfut = _crossing.submit(other_loop, forever())
    assert started.acquire(timeout=10)
    assert cfut.cancel()                    # the caller's concurrent future
    with pytest.raises(concurrent.futures.CancelledError):
        cfut.result(10)
    assert cancelled.acquire(timeout=10)

    async def caller() -> None:
        afut = _crossing.wrap(_crossing.submit(other_loop, forever()),
                              asyncio.get_running_loop())
        await asyncio.get_running_loop().run_in_executor(None, started.acquire)
        afut.cancel()                       # the awaiting side's future
        with pytest.raises(asyncio.CancelledError):
            await afut

    asyncio.run(caller())
    assert cancelled.acquire(timeout=10)


def test_a_call_cancelled_before_the_loop_ran_it_never_starts(other_loop) -> None:
    held = threading.Event()
    release = threading.Event()
    ran: list[int] = []

    async def mark() -> None:
        ran.append(1)

    def block() -> None:
        held.set()
        release.wait(10)

    other_loop.call_soon_threadsafe(block)
    assert held.wait(10)
    cfut = _crossing.submit(other_loop, mark())
    assert cfut.cancel()
    after = _crossing.submit(other_loop, _double(1))
    release.set()
    assert after.result(10) == 2
    assert ran == []
