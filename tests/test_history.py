"""The controller's bounded memory for operators: events and revisions."""

from __future__ import annotations

import asyncio

from fleet._controller.history import Events, Revisions


def test_events_are_a_bounded_ring_and_waiters_wake():
    events = Events(size=3)
    for i in range(5):
        events.add("k", message=str(i))
    assert [e["message"] for e in events.since()] == ["2", "3", "4"]
    assert [e["message"] for e in events.since(after_seq=4)] == ["4"]

    async def go():
        waiter = asyncio.ensure_future(events.wait(events.seq, 30))
        await asyncio.sleep(0)
        events.add("k", message="new")
        await asyncio.wait_for(waiter, 5)
        await events.wait(events.seq, 0.01)      # nothing new: returns at its deadline
    asyncio.run(go())


def test_revisions_are_bounded_per_application_and_in_number_of_applications():
    revs = Revisions(size=2, max_apps=2)
    for i in range(3):
        revs.add("a", (), {"i": i})
    assert [r["revision"] for r in revs.list("a")] == [2, 3] and revs.latest("a") == 3
    assert revs.add("a", (), {"i": 2}, same_as_latest=True) == 3     # unchanged
    assert revs.add("a", (), {"i": 9}, same_as_latest=True) == 4     # config differs
    revs.add("b", (), {})
    revs.add("c", (), {})
    assert revs.list("a") == [] and revs.latest("a") == 0        # least recent dropped
    assert revs.get("c", 1) is not None
