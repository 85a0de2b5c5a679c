"""Flow control for streams between two fleet processes. No I/O here.

Every streamed call has a window in each direction it streams: replies (CHUNK frames,
replica -> caller) and messages into the running call (DATA frames, caller -> replica).
The producer counts what it sent and the consumer returns credit (a CREDIT frame with
the chunks and bytes it read) once it has read half a window. A producer that is a
whole window ahead waits for credit before it produces more: a user's generator is
simply not resumed, so a consumer that reads nothing holds at most one window of its
stream in memory on either side.

Why both chunks and bytes: many small chunks (tokens) cost per-frame memory and
work, few large ones (files) cost bytes. A chunk is always allowed when nothing is
outstanding, so a single chunk larger than the window still moves.

Why the consumer credits half a window at a time: it keeps CREDIT frames to one per
32 chunks or 512 KiB, and it cannot deadlock: a producer waits only while at least a
window is unread, and once the consumer has read that much it has read at least half
a window since its last credit, so it sends one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

WINDOW_CHUNKS = 64
WINDOW_BYTES = 1 << 20
_CREDIT_CHUNKS = WINDOW_CHUNKS // 2
_CREDIT_BYTES = WINDOW_BYTES // 2


class Window:
    """The producer's side of one stream: how far it is ahead of its consumer."""

    __slots__ = ("chunks", "nbytes", "waiter", "sent_total")

    def __init__(self) -> None:
        self.chunks = 0
        self.nbytes = 0
        self.waiter: asyncio.Future[None] | None = None
        self.sent_total = 0

    @property
    def full(self) -> bool:
        return self.chunks >= WINDOW_CHUNKS or self.nbytes >= WINDOW_BYTES

    def sent(self, size: int) -> bool:
        """Count one chunk of size bytes; True when the producer must now wait."""
        self.chunks += 1
        self.nbytes += size
        self.sent_total += 1
        return self.chunks >= WINDOW_CHUNKS or self.nbytes >= WINDOW_BYTES

    def grant(self, chunks: int, nbytes: int) -> None:
        """The consumer read chunks/nbytes more."""
        self.chunks = max(0, self.chunks - chunks)
        self.nbytes = max(0, self.nbytes - nbytes)
        w = self.waiter
        if w is not None and not w.done() and not self.full:
            w.set_result(None)

    async def wait(self, loop: asyncio.AbstractEventLoop) -> None:
        """Until the consumer has read enough for one more chunk."""
        while self.full:
            self.waiter = loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


class Credits:
    """The consumer's side of one stream: what it read since it last sent credit."""

    __slots__ = ("chunks", "nbytes")

    def __init__(self) -> None:
        self.chunks = 0
        self.nbytes = 0

    def read(self, size: int) -> tuple[int, int] | None:
        """Count one chunk read; the (chunks, bytes) to credit when it is time."""
        self.chunks += 1
        self.nbytes += size
        if self.chunks >= _CREDIT_CHUNKS or self.nbytes >= _CREDIT_BYTES:
            credit = (self.chunks, self.nbytes)
            self.chunks = self.nbytes = 0
            return credit
        return None


class Inbox:
    """Messages a caller sent into a running call, read by the call; reading returns
    credit to the caller through send_credit(chunks, bytes). Holds at most about a
    window, since the caller waits for credit."""

    __slots__ = ("_items", "_waiter", "_credits", "_send_credit", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 send_credit: Callable[[int, int], None]) -> None:
        self._items: deque[tuple[Any, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._credits = Credits()
        self._send_credit = send_credit
        self._loop = loop

    def put(self, obj: Any, size: int) -> None:
        """A message arrived (size: its frame's payload bytes)."""
        self._items.append((obj, size))
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def put_nowait(self, obj: Any) -> None:
        """Put back a marker (counts for no credit)."""
        self.put(obj, -1)

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        items = self._items
        while not items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        obj, size = items.popleft()
        if size >= 0:
            credit = self._credits.read(size)
            if credit is not None:
                self._send_credit(*credit)
        return obj
