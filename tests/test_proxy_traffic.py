"""The traffic choice on its own (no processes), shared by the proxies and app handles:
splits by cumulative share, and at most 256 shadow copies in flight per runtime."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from fleet import _traffic as traffic


class _Runtime:
    def __init__(self, policy: dict[str, Any]) -> None:
        self.tables = {"traffic": {"/svc": policy}}
        self.loop = asyncio.get_running_loop()
        self.shadows: set[asyncio.Task[None]] = set()


def test_split_follows_cumulative_shares(monkeypatch) -> None:
    async def go() -> None:
        rt = _Runtime({"split": [["a", "A", 0.25], ["b", "B", 1.0]], "shadow": []})
        for draw, want in ((0.0, "a"), (0.2, "a"), (0.25, "b"), (0.99, "b")):
            monkeypatch.setattr(random, "random", lambda d=draw: d)
            assert traffic.choose(rt, "/svc", "own", "Own")[0] == want
        assert traffic.choose(rt, "/other", "own", "Own") == ("own", "Own")

    asyncio.run(go())


def test_shadow_copies_in_flight_are_capped() -> None:
    async def go() -> None:
        rt = _Runtime({"split": [], "shadow": [["s", "S", 1.0]]})
        gate = asyncio.Event()

        async def slow_shadow(app: str, ingress: str) -> None:
            await gate.wait()

        for _ in range(traffic.MAX_SHADOW_INFLIGHT + 50):
            # the client's own request is routed as usual, copies or not
            assert traffic.choose(rt, "/svc", "own", "Own", slow_shadow) == ("own", "Own")
        await asyncio.sleep(0)
        assert traffic.shadows_in_flight(rt) == traffic.MAX_SHADOW_INFLIGHT == 256
        gate.set()
        while traffic.shadows_in_flight(rt):
            await asyncio.sleep(0)

    asyncio.run(go())


def test_shadow_copies_belong_to_their_runtime() -> None:
    async def go() -> None:
        first = _Runtime({"split": [], "shadow": [["s", "S", 1.0]]})
        second = _Runtime({"split": [], "shadow": [["s", "S", 1.0]]})
        gate = asyncio.Event()

        async def slow_shadow(app: str, ingress: str) -> None:
            await gate.wait()

        for _ in range(traffic.MAX_SHADOW_INFLIGHT):
            traffic.choose(first, "/svc", "own", "Own", slow_shadow)
        # the first runtime's full budget leaves the second's untouched
        traffic.choose(second, "/svc", "own", "Own", slow_shadow)
        await asyncio.sleep(0)
        assert traffic.shadows_in_flight(first) == traffic.MAX_SHADOW_INFLIGHT
        assert traffic.shadows_in_flight(second) == 1
        gate.set()
        await asyncio.wait_for(asyncio.gather(*first.shadows, *second.shadows), 10)
        await asyncio.sleep(0)      # the done callbacks run after the tasks finish
        assert traffic.shadows_in_flight(first) == traffic.shadows_in_flight(second) == 0

    asyncio.run(go())
