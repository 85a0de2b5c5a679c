"""The Router: one per caller and deployment. Picks replicas by power of two choices
on its own in-flight counts, keeps at most ``max_ongoing_requests`` on each, queues the
rest in arrival order and refuses past ``max_queued_requests``. No I/O on the choice.

A call for a multiplexed model goes to the least loaded replica holding that model
with room; failing that, to the replica with room holding the fewest models, which is
then taken to hold it. Replicas correct that view by reporting what they hold.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from fleet._types import DeploymentStatus, DeploymentTable
from fleet._wire.channel import Channel
from fleet.exceptions import BackPressureError, DeploymentFailedError, FleetError

# How long a replica that refused a call as full is left alone before it is tried again.
FULL_PAUSE_S = 0.005


class Slot:
    """One replica as this caller sees it."""

    __slots__ = ("replica_id", "address", "inflight", "channel", "connecting", "gone",
                 "models", "full")

    def __init__(self, replica_id: str, address: str) -> None:
        self.models: set[str] = set()       # multiplexed model ids it holds (or will)
        self.replica_id = replica_id
        self.address = address
        self.inflight = 0
        self.full = False       # it refused a call: other callers fill it (for a moment)
        self.channel: Channel | None = None
        self.connecting: asyncio.Future[Channel] | None = None
        self.gone = False


class Router:
    """Replica choice and limits for one deployment, as seen by one process."""

    def __init__(self, key: str, connect: Callable[[str, str], Awaitable[Channel]]) -> None:
        self.key = key
        self.app, _, self.deployment = key.partition("#")
        self._connect = connect
        self.slots: list[Slot] = []
        self._by_id: dict[str, Slot] = {}
        self.max_ongoing = 100
        self.max_queued = -1
        # None: not in the tables (not yet, or deleted: see known)
        self.status: DeploymentStatus | None = DeploymentStatus.UPDATING
        self.message = ""
        self.known = False
        self.queue: deque[asyncio.Future[Slot]] = deque()
        self._wants: dict[asyncio.Future[Slot], str] = {}   # queued calls' model ids
        self.queued_total = 0
        self.closed = ""        # why calls are refused for good (the instance stopped)

    # -- table updates ---------------------------------------------------------
    def update(self, table: DeploymentTable | None) -> None:
        if table is None:
            self.known = False
            self.status = None
            self.slots = []
            for slot in self._by_id.values():
                slot.gone = True
            self._by_id = {}
            self._fail_waiters(DeploymentFailedError(
                f"deployment {self.deployment!r} of application {self.app!r} was deleted"))
            return
        self.known = True
        self.max_ongoing = table["max_ongoing_requests"]
        self.max_queued = table["max_queued_requests"]
        self.status = DeploymentStatus(table["status"])
        self.message = table["message"]
        new: dict[str, Slot] = {}
        for r in table["replicas"]:
            known = self._by_id.get(r["replica_id"])
            slot = known if known is not None and not known.gone else \
                Slot(r["replica_id"], r["address"])
            if "models" in r and (slot.channel is None or slot.channel.closed):
                # What the controller heard; a connected replica tells this caller itself.
                slot.models = set(r["models"])
            new[slot.replica_id] = slot
        for rid, slot in self._by_id.items():
            if rid not in new:
                slot.gone = True
        self._by_id = new
        self.slots = list(new.values())
        if self.status is DeploymentStatus.DEPLOY_FAILED and not self.slots:
            self._fail_waiters(DeploymentFailedError(self.message or (
                f"deployment {self.deployment!r} of application {self.app!r} failed")))
        self._wake()

    def set_models(self, replica_id: str, models: list[str]) -> None:
        """What a replica reports it holds, replacing this router's guess."""
        slot = self._by_id.get(replica_id)
        if slot is not None:
            slot.models = set(models)

    def drop(self, slot: Slot) -> None:
        """Stop using a replica whose connection failed, before the table says so."""
        slot.gone = True
        if self._by_id.get(slot.replica_id) is slot:
            del self._by_id[slot.replica_id]
            self.slots = list(self._by_id.values())

    # -- choosing ----------------------------------------------------------------
    def _pick(self) -> Slot | None:
        slots = self.slots
        n = len(slots)
        limit = self.max_ongoing
        if n == 1:
            s = slots[0]
            return s if s.inflight < limit and not s.full else None
        if n == 0:
            return None
        a, b = random.sample(slots, 2)
        if b.inflight < a.inflight:
            a, b = b, a
        if a.inflight < limit and not a.full:
            return a
        free = [s for s in slots if s.inflight < limit and not s.full]
        return min(free, key=lambda s: s.inflight) if free else None

    def _pick_model(self, model: str, record: bool = True) -> Slot | None:
        """A replica with room for a call of model: one that holds it if possible,
        else the one a load evicts least from, then guessed to hold it (when record)."""
        limit = self.max_ongoing
        best: Slot | None = None
        for s in self.slots:
            if model in s.models and s.inflight < limit and not s.full and (
                    best is None or s.inflight < best.inflight):
                best = s
        if best is not None:
            return best
        # No holder with room: load it where it evicts least.
        for s in self.slots:
            if s.inflight < limit and not s.full and (
                    best is None or (len(s.models), s.inflight) <
                                       (len(best.models), best.inflight)):
                best = s
        if best is not None and record:
            best.models.add(model)
        return best

    def try_acquire(self, model: str | None = None) -> Slot | None:
        """A replica with room and an open connection, taken now; None when a call
        would have to wait (for room, a connection, a replica) or be refused: then
        :meth:`acquire` is the way, and it says why."""
        if self.queue:
            return None
        slot = self._pick() if model is None else self._pick_model(model, record=False)
        if slot is None:
            return None
        ch = slot.channel
        if ch is None or ch.closed:
            return None         # nothing taken: the model is not guessed to be there
        if model is not None:
            slot.models.add(model)
        slot.inflight += 1
        return slot

    async def acquire(self, model: str | None = None,
                      on_queue: Callable[[asyncio.Future[Slot]], None] | None = None
                      ) -> Slot:
        """A replica with room, waiting in order if none has; raises when refused.
        With a multiplexed model id, one that holds the model if possible.

        A call that must wait calls on_queue with its place in the queue: cancelling
        that future (the caller went away) drops the call from the queue, and acquire
        raises CancelledError."""
        if not self.queue:
            slot = self._pick() if model is None else self._pick_model(model)
            if slot is not None:
                slot.inflight += 1
                return slot
        if 0 <= self.max_queued <= len(self.queue):
            raise BackPressureError(
                f"deployment {self.deployment!r} of application {self.app!r} already has "
                f"{len(self.queue)} queued calls (max_queued_requests={self.max_queued}); "
                "retry later or raise the limit")
        if self.status is DeploymentStatus.DEPLOY_FAILED and not self.slots:
            raise DeploymentFailedError(self.message or f"deployment {self.deployment!r} failed")
        if self.closed:
            raise FleetError(self.closed)
        fut: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self.queue.append(fut)
        if model is not None:
            self._wants[fut] = model
        self.queued_total += 1
        if on_queue is not None:
            on_queue(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())
            raise
        finally:
            if model is not None:
                self._wants.pop(fut, None)
            # a place given a slot or an error was taken off the queue already; only a
            # cancelled (or abandoned) one may still be in it (a miss would cost a
            # ValueError, whose message is the future's repr: microseconds per call)
            if fut.cancelled() or not fut.done():
                try:
                    self.queue.remove(fut)
                except ValueError:
                    pass

    def refused(self, slot: Slot) -> None:
        """The replica refused a call because it was full: other callers' calls fill it,
        which this router's counts do not see. It is not picked for FULL_PAUSE_S, while
        calls wait in the queue (or go to other replicas); then it is tried again."""
        if not slot.full:
            slot.full = True
            asyncio.get_running_loop().call_later(FULL_PAUSE_S, self._not_full, slot)

    def _not_full(self, slot: Slot) -> None:
        slot.full = False
        if self.queue:
            self._wake()

    def release(self, slot: Slot) -> None:
        slot.inflight -= 1
        if self.queue:
            self._wake()

    def _wake(self) -> None:
        queue = self.queue
        while queue:
            fut = queue[0]
            if fut.done():
                queue.popleft()
                continue
            model = self._wants.get(fut) if self._wants else None
            slot = self._pick() if model is None else self._pick_model(model)
            if slot is None:
                return
            queue.popleft()
            slot.inflight += 1
            fut.set_result(slot)

    def close(self, why: str) -> None:
        """Fail the waiting calls and every later one that would have to wait."""
        self.closed = why
        self._fail_waiters(FleetError(why))

    def _fail_waiters(self, exc: BaseException) -> None:
        while self.queue:
            fut = self.queue.popleft()
            if not fut.done():
                fut.set_exception(exc)

    async def channel(self, slot: Slot) -> Channel:
        """The slot's connection, opened on first use and shared by all calls."""
        ch = slot.channel
        if ch is not None and not ch.closed:
            return ch
        if slot.connecting is None or slot.connecting.done() and slot.channel is ch:
            loop = asyncio.get_running_loop()
            slot.connecting = loop.create_future()
            connecting = slot.connecting
            try:
                ch = await self._connect(
                    slot.address, f"replica {slot.replica_id} of deployment "
                                  f"{self.deployment!r} (application {self.app!r})")
            except BaseException as exc:
                connecting.set_exception(exc)
                connecting.exception()
                slot.connecting = None
                raise
            slot.channel = ch
            connecting.set_result(ch)
            return ch
        return await asyncio.shield(slot.connecting)

    def stats(self) -> dict[str, Any]:
        """In-flight and queued calls, for the autoscaler and metrics."""
        return {"inflight": sum(s.inflight for s in self.slots), "queued": len(self.queue)}
