"""What the controller remembers for operators: a bounded ring of events and each
application's revisions (what was deployed, when, and how to deploy it again)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

# Bounds: the newest events and revisions are kept, the oldest dropped.
MAX_EVENTS = 1000
MAX_REVISIONS = 20
MAX_APPS = 500          # applications whose history is kept (the least recently deployed go)


class Events:
    """A ring buffer of events with a sequence number each; waiters wake on a new one."""

    def __init__(self, size: int = MAX_EVENTS) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=size)
        self.seq = 0
        self._new: asyncio.Event | None = None

    def add(self, kind: str, application: str = "", deployment: str = "", replica: str = "",
            message: str = "") -> None:
        self.seq += 1
        self._ring.append({"seq": self.seq, "time": time.time(), "kind": kind,
                           "application": application, "deployment": deployment,
                           "replica": replica, "message": message})
        if self._new is not None:
            self._new.set()
            self._new = None

    def since(self, t: float = 0.0, after_seq: int = 0) -> list[dict[str, Any]]:
        """Events newer than Unix time t and than sequence number after_seq, oldest first."""
        return [e for e in self._ring if e["time"] > t and e["seq"] > after_seq]

    async def wait(self, after_seq: int, timeout_s: float) -> None:
        """Return once an event newer than after_seq exists, or after timeout_s."""
        if self.seq > after_seq:
            return
        if self._new is None:
            self._new = asyncio.Event()
        try:
            await asyncio.wait_for(self._new.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass


class Revisions:
    """Each application's deploys, numbered from 1, the newest MAX_REVISIONS kept
    (also after the application is deleted, so it can be deployed again)."""

    def __init__(self, size: int = MAX_REVISIONS, max_apps: int = MAX_APPS) -> None:
        self.size = size
        self.max_apps = max_apps
        self._by_app: dict[str, deque[dict[str, Any]]] = {}
        self._counter: dict[str, int] = {}

    def add(self, app: str, deploy_args: tuple[Any, ...], config: Any,
            note: str = "", same_as_latest: bool = False) -> int:
        """Record a deploy; returns its number. A deploy identical to the latest one
        (same_as_latest) records nothing and returns the latest's number."""
        ring = self._by_app.pop(app, None) or deque(maxlen=self.size)
        self._by_app[app] = ring            # most recently deployed last
        if same_as_latest and ring and ring[-1]["config"] == config:
            return int(ring[-1]["revision"])
        number = self._counter.get(app, 0) + 1
        self._counter[app] = number
        ring.append({"revision": number, "time": time.time(), "config": config,
                     "note": note, "deploy_args": deploy_args})
        while len(self._by_app) > self.max_apps:
            oldest = next(iter(self._by_app))
            del self._by_app[oldest]
            self._counter.pop(oldest, None)
        return number

    def list(self, app: str) -> list[dict[str, Any]]:
        return list(self._by_app.get(app, ()))

    def get(self, app: str, number: int) -> dict[str, Any] | None:
        return next((r for r in self._by_app.get(app, ()) if r["revision"] == number), None)

    def latest(self, app: str) -> int:
        return self._counter.get(app, 0)
