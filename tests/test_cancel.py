"""RequestCancelledError is what a cancelled call gives whoever waits for it: result(),
await from another loop, await inside a replica, fleet.get and fleet.wait (memory
backend). Over real processes: tests/test_errors.py."""

from __future__ import annotations

import asyncio

import pytest

import fleet


@fleet.deployment(max_ongoing_requests=100)
class Hanger:
    async def hang(self) -> None:
        await asyncio.Event().wait()


@fleet.deployment
class Canceller:
    def __init__(self, hanger: fleet.DeploymentHandle) -> None:
        self.hanger = hanger

    async def __call__(self) -> str:
        # on the replica's own loop: the call is a task there
        response = self.hanger.hang.remote()
        await asyncio.sleep(0)
        response.cancel()
        try:
            await response
        except fleet.RequestCancelledError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"


def _cancelled(handle: fleet.DeploymentHandle) -> fleet.DeploymentResponse:
    response = handle.hang.remote()
    response.cancel()
    return response


def test_result_of_a_cancelled_call_raises_request_cancelled_error(memory_instance) -> None:
    hanger = fleet.run(Hanger.bind(), name="hanger", route_prefix=None)
    with pytest.raises(fleet.RequestCancelledError,
                       match=r"call to Hanger\.hang \(application 'hanger'\) was cancelled "
                             "by its caller"):
        _cancelled(hanger).result(timeout_s=10)

    async def awaited() -> None:
        await _cancelled(hanger)

    with pytest.raises(fleet.RequestCancelledError):
        asyncio.run(awaited())


def test_a_call_cancelled_inside_a_replica_raises_it_there(memory_instance) -> None:
    handle = fleet.run(Canceller.bind(Hanger.bind()), name="inside", route_prefix=None)
    assert handle.remote().result(timeout_s=10) == (
        "RequestCancelledError: the call to Hanger.hang (application 'inside') was "
        "cancelled by its caller")


def test_fleet_get_of_a_cancelled_call_raises_it(memory_instance) -> None:
    hanger = fleet.run(Hanger.bind(), name="hanger", route_prefix=None)
    with pytest.raises(fleet.RequestCancelledError):
        fleet.get([_cancelled(hanger)], timeout=10)

    async def in_async() -> None:
        await fleet.get(_cancelled(hanger), timeout=10)

    with pytest.raises(fleet.RequestCancelledError):
        asyncio.run(in_async())
    # fleet.wait counts a cancelled call as finished; getting it raises
    ready, not_ready = fleet.wait([_cancelled(hanger)], timeout=10)
    assert len(ready) == 1 and not_ready == []
    with pytest.raises(fleet.RequestCancelledError):
        fleet.get(ready)
