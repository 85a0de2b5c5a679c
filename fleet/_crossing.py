"""Calls that cross between event loops in different threads, with one wake-up per
burst instead of one per call.

A driver's handle calls run on the instance's loop (its own thread); a caller on
another loop (an ``asyncio.run`` script) gets each result back on its own loop.
``asyncio.run_coroutine_threadsafe`` and ``asyncio.wrap_future`` wake the other loop
once per call each way (a lock, a handle and a write to the loop's self-pipe every
time). Here every loop has a :class:`Mailbox`: what other threads post to it while it
has not run yet waits in order and is run by a single ``call_soon_threadsafe``, so a
burst of 200 calls costs one wake-up each way, not 400.

The futures behave as ``run_coroutine_threadsafe``'s and ``wrap_future``'s do:
cancelling the concurrent future cancels the task, cancelling the awaiting future
cancels the call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = \
    weakref.WeakKeyDictionary()


class Mailbox:
    """Callbacks for one loop from any thread, run on it in the order posted.

    Unbounded by design, like the loop's own ready queue that it stands in for: it
    holds what callers already started, one entry per call, until the loop runs."""

    __slots__ = ("loop", "items", "scheduled", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self.scheduled = False

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        # Append first, then look at the flag: the loop clears the flag before it
        # empties the queue, so an entry is either seen by a run already under way or
        # schedules a new one; a run that finds nothing costs nothing.
        self.items.append((fn, args))
        if not self.scheduled:
            self.scheduled = True
            if self.loop.is_closed():
                return
            self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        self.scheduled = False
        items = self.items
        while items:
            fn, args = items.popleft()
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - one bad callback must not stop the rest
                self.loop.call_exception_handler({"message": "fleet mailbox callback failed",
                                                  "exception": exc})


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """loop's mailbox, made on first use (lives as long as the loop)."""
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes.setdefault(loop, Mailbox(loop))
    return box


def submit(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]
           ) -> concurrent.futures.Future[Any]:
    """Run coro as a task on loop (in another thread); its outcome in a concurrent
    future, like ``asyncio.run_coroutine_threadsafe``."""
    cfut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    mailbox(loop).post(_start, loop, coro, cfut)
    return cfut


def _start(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
           cfut: concurrent.futures.Future[Any]) -> None:
    if cfut.cancelled():            # cancelled before the loop got to it
        coro.close()
        return
    task = loop.create_task(coro)
    task.add_done_callback(functools.partial(_settle, cfut))
    cfut.add_done_callback(functools.partial(_cancel_task, loop, task))


def _settle(cfut: concurrent.futures.Future[Any], task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        cfut.cancel()
        return
    if not cfut.set_running_or_notify_cancel():
        return
    exc = task.exception()
    if exc is not None:
        cfut.set_exception(exc)
    else:
        cfut.set_result(task.result())


def _cancel_task(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any],
                 cfut: concurrent.futures.Future[Any]) -> None:
    if cfut.cancelled() and not task.done():
        mailbox(loop).post(task.cancel)


def wrap(cfut: concurrent.futures.Future[Any], loop: asyncio.AbstractEventLoop
         ) -> asyncio.Future[Any]:
    """An asyncio future on loop (the running one) with cfut's outcome, like
    ``asyncio.wrap_future``."""
    afut = loop.create_future()
    box = mailbox(loop)
    cfut.add_done_callback(lambda f: box.post(_copy, f, afut))
    afut.add_done_callback(lambda f: cfut.cancel() if f.cancelled() else None)
    return afut


def _copy(cfut: concurrent.futures.Future[Any], afut: asyncio.Future[Any]) -> None:
    if afut.done():
        return
    if cfut.cancelled():
        afut.cancel()
        return
    exc = cfut.exception()
    if exc is not None:
        afut.set_exception(exc)
    else:
        afut.set_result(cfut.result())
