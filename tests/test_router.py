"""The Router on its own (no processes): power of two choices on in-flight counts, the
max_ongoing_requests limit, FIFO waiting, refusals past max_queued_requests."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest

from fleet._router import Router
from fleet.exceptions import BackPressureError, DeploymentFailedError, FleetError


def _table(n: int, max_ongoing: int = 2, max_queued: int = -1) -> Any:
    return {"replicas": [{"replica_id": f"r{i}", "address": f"unix:/nowhere/r{i}"}
                         for i in range(n)],
            "max_ongoing_requests": max_ongoing, "max_queued_requests": max_queued,
            "status": "HEALTHY", "message": "", "legacy_refs": False, "autoscaling": False}


async def _no_connect(address: str, peer: str) -> Any:
    raise AssertionError("the choice must not open connections")


def _router(n: int, **kw: Any) -> Router:
    router = Router("app#dep", _no_connect)
    router.update(_table(n, **kw))
    return router


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_two_choices_pick_the_replica_with_fewer_in_flight() -> None:
    async def go() -> None:
        router = _router(2, max_ongoing=100)
        busy, idle = router.slots
        busy.inflight = 5
        for _ in range(50):
            slot = await router.acquire()
            assert slot is idle
            router.release(slot)
        # with equal loads, calls spread over every replica
        router = _router(4, max_ongoing=100)
        picks = collections.Counter()
        for _ in range(400):
            slot = await router.acquire()
            picks[slot.replica_id] += 1
        assert set(picks) == {"r0", "r1", "r2", "r3"}

    asyncio.run(go())


def test_never_more_than_max_ongoing_and_waiters_are_served_in_order() -> None:
    async def go() -> None:
        router = _router(2, max_ongoing=2)
        held = [await router.acquire() for _ in range(4)]
        assert sorted(s.inflight for s in router.slots) == [2, 2]
        order: list[int] = []

        async def wait(i: int) -> None:
            slot = await router.acquire()
            order.append(i)
            held.append(slot)

        waiters = [asyncio.ensure_future(wait(i)) for i in range(5)]
        await _settle()
        assert order == [] and len(router.queue) == 5
        for _ in range(5):
            router.release(held.pop(0))
            await _settle()
            assert all(s.inflight <= 2 for s in router.slots)
        await asyncio.gather(*waiters)
        assert order == [0, 1, 2, 3, 4]

    asyncio.run(go())


def test_refused_at_once_past_max_queued_and_cancelled_waiters_leave_the_queue() -> None:
    async def go() -> None:
        router = _router(1, max_ongoing=1, max_queued=2)
        first = await router.acquire()
        a = asyncio.ensure_future(router.acquire())
        b = asyncio.ensure_future(router.acquire())
        await _settle()
        with pytest.raises(BackPressureError, match="max_queued_requests=2"):
            await router.acquire()
        a.cancel()
        await _settle()
        assert len(router.queue) == 1
        router.release(first)
        assert (await b).inflight == 1      # the cancelled waiter took nothing

    asyncio.run(go())


def test_waiters_fail_when_the_deployment_is_deleted_or_failed() -> None:
    async def go() -> None:
        router = _router(1, max_ongoing=1)
        await router.acquire()
        waiting = asyncio.ensure_future(router.acquire())
        await _settle()
        router.update(None)
        with pytest.raises(DeploymentFailedError, match="was deleted"):
            await waiting
        router = Router("app#dep", _no_connect)
        failed = dict(_table(0), status="DEPLOY_FAILED", message="constructor raised")
        waiting = asyncio.ensure_future(router.acquire())
        await _settle()
        router.update(failed)
        with pytest.raises(DeploymentFailedError, match="constructor raised"):
            await waiting

    asyncio.run(go())


def test_closed_router_fails_waiters_and_refuses_to_queue() -> None:
    async def go() -> None:
        router = _router(1, max_ongoing=1)
        held = await router.acquire()
        waiting = asyncio.ensure_future(router.acquire())
        await _settle()
        router.close("the instance stopped")
        with pytest.raises(FleetError, match="the instance stopped"):
            await waiting
        with pytest.raises(FleetError, match="the instance stopped"):
            await router.acquire()
        router.release(held)

    asyncio.run(go())


def test_a_replica_that_refused_as_full_is_skipped_then_tried_again() -> None:
    async def go() -> None:
        router = _router(2, max_ongoing=10)
        full, other = router.slots
        router.refused(full)            # other callers fill it: this router cannot see
        for _ in range(20):
            slot = await router.acquire()
            assert slot is other
            router.release(slot)
        router.refused(other)
        waiting = asyncio.ensure_future(router.acquire())   # nothing has room now
        await _settle()
        assert not waiting.done() and len(router.queue) == 1
        # after a pause both are tried again, and the waiting call gets one
        slot = await asyncio.wait_for(waiting, 5)
        assert slot in (full, other) and not full.full and not other.full

    asyncio.run(go())


def test_try_acquire_guesses_a_model_only_where_it_sends_the_call() -> None:
    # a replica with no open connection is not taken now, and must not be recorded as
    # holding the model the call would have loaded there
    router = _router(1, max_ongoing=4)
    (slot,) = router.slots
    assert router.try_acquire("m1") is None
    assert slot.models == set() and slot.inflight == 0

    class _Open:
        closed = False

    slot.channel = _Open()  # type: ignore[assignment]
    assert router.try_acquire("m1") is slot
    assert slot.models == {"m1"} and slot.inflight == 1
