"""fleet.get and fleet.wait over replicas on the memory backend, with Ray's semantics:
order kept, errors raised in list order, GetTimeoutError past the timeout, (ready,
not_ready) from wait, from sync code, from async code on another loop and inside a
replica."""

from __future__ import annotations

import asyncio
import threading

import pytest

import fleet
from fleet.exceptions import GetTimeoutError


@fleet.deployment(max_ongoing_requests=100)
class Gate:
    """``wait_open`` calls block until ``open`` is called; ``echo`` answers at once."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def echo(self, x: int) -> int:
        return x

    async def wait_open(self, x: int) -> int:
        await self.opened.wait()
        return x

    async def open(self) -> None:
        self.opened.set()

    async def close(self) -> None:
        self.opened = asyncio.Event()

    async def fail(self, x: int) -> int:
        raise ValueError(f"bad {x}")


@fleet.deployment
class Fanout:
    """Uses fleet.get / fleet.wait inside a replica (async code on the replica's loop)."""

    def __init__(self, gate: fleet.DeploymentHandle) -> None:
        self.gate = gate

    async def __call__(self, n: int) -> list:
        responses = [self.gate.echo.remote(i) for i in range(n)]
        ready, not_ready = await fleet.wait(responses, num_returns=n, timeout=30)
        assert not not_ready
        return await fleet.get(ready)


@pytest.fixture(scope="module")
def gate(shared_memory_instance):
    handle = fleet.run(Gate.bind(), name="gate", route_prefix=None)
    yield handle
    handle.open.remote().result()


def test_get_keeps_order_and_takes_one_response_or_a_list(gate) -> None:
    responses = [gate.echo.remote(i) for i in range(20)]
    assert fleet.get(responses) == list(range(20))
    assert fleet.get(gate.echo.remote(7)) == 7
    assert fleet.get([]) == []


def test_get_raises_the_first_error_in_list_order(gate) -> None:
    responses = [gate.echo.remote(1), gate.fail.remote(2), gate.fail.remote(3)]
    with pytest.raises(ValueError, match="bad 2"):
        fleet.get(responses)


def test_get_past_its_timeout_raises_get_timeout_error(gate) -> None:
    gate.close.remote().result()
    blocked = gate.wait_open.remote(1)
    quick = gate.echo.remote(0)
    assert quick.result(timeout_s=30) == 0      # done before the 0.05 s start counting
    with pytest.raises(GetTimeoutError, match="1 of 2 calls") as err:
        fleet.get([quick, blocked], timeout=0.05)
    assert isinstance(err.value, TimeoutError)
    gate.open.remote().result()
    assert fleet.get(blocked, timeout=30) == 1      # the call went on running


def test_wait_splits_ready_from_not_ready_in_input_order(gate) -> None:
    gate.close.remote().result()
    blocked = [gate.wait_open.remote(i) for i in range(3)]
    quick = [gate.echo.remote(i) for i in range(3)]
    mixed = [blocked[0], quick[0], blocked[1], quick[1], quick[2], blocked[2]]
    ready, not_ready = fleet.wait(mixed, num_returns=3, timeout=30)
    assert ready == [quick[0], quick[1], quick[2]]
    assert not_ready == [blocked[0], blocked[1], blocked[2]]
    ready, not_ready = fleet.wait(mixed, num_returns=4, timeout=0.05)   # times out
    assert ready == quick and not_ready == blocked
    ready, not_ready = fleet.wait(mixed, num_returns=1)
    assert len(ready) == 1 and ready[0] in quick and len(not_ready) == 5
    gate.open.remote().result()
    ready, not_ready = fleet.wait(mixed, num_returns=6)
    assert ready == mixed and not_ready == []
    failed = gate.fail.remote(1)
    assert fleet.wait([failed]) == ([failed], [])       # an error counts as ready


def test_bad_arguments_are_clear_errors(gate) -> None:
    r = gate.echo.remote(1)
    with pytest.raises(TypeError, match="item 1: expected a DeploymentResponse"):
        fleet.get([r, 5])
    with pytest.raises(ValueError, match="num_returns must be from 1 to the number"):
        fleet.wait([r], num_returns=2)
    with pytest.raises(ValueError, match="timeout must be None or a number >= 0"):
        fleet.get([r], timeout=-1)
    with pytest.raises(ValueError, match="listed twice"):
        fleet.wait([r, r], num_returns=1)


def test_usable_from_async_code_on_another_loop(gate) -> None:
    async def main() -> tuple[list, int]:
        responses = [gate.echo.remote(i) for i in range(5)]
        ready, _ = await fleet.wait(responses, num_returns=5, timeout=30)
        return await fleet.get(ready), await fleet.get(gate.echo.remote(9))

    assert asyncio.run(main()) == (list(range(5)), 9)


def test_usable_inside_a_replica_and_from_threads(gate) -> None:
    handle = fleet.run(Fanout.bind(Gate.bind()), name="fanout", route_prefix=None)
    assert handle.remote(10).result() == list(range(10))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        fleet.get([gate.echo.remote(i) for i in range(10)]))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [list(range(10))] * 4
