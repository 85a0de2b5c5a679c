"""Dynamic batching: ``@fleet.batch`` groups concurrent calls into one list call.

Each replica keeps one queue per batched method and object. A batch runs as soon as it
holds ``max_batch_size`` calls or its oldest call has waited ``batch_wait_timeout_s``;
at most ``max_concurrent_batches`` batches of one method run at once. A batch holds the
calls of one multiplexed model id only (the oldest call's), and runs with that id as
its :func:`fleet.get_multiplexed_model_id`. Batch sizes are
counted per method (:func:`batch_stats`) and reported to the controller with every
health check, so ``fleet.status()`` shows them.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from fleet import _otel
from fleet._context import current_traceparent
from fleet._metrics import SIZE_BUCKETS, TIME_BUCKETS, new_hist, observe
from fleet._multiplex import get_multiplexed_model_id, set_model_id

F = TypeVar("F", bound=Callable[..., Any])

_END = object()


class _Failed:
    """An error travelling through a streaming caller's queue."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


# How many streamed items a batch runs ahead of each of its readers.
STREAM_AHEAD = 64


class _Entry:
    """One caller waiting in a batch queue."""

    __slots__ = ("item", "arrived", "future", "chunks", "taken", "model", "left", "trace")

    def __init__(self, item: Any, loop: asyncio.AbstractEventLoop, stream: bool) -> None:
        self.item = item
        self.model = get_multiplexed_model_id()
        self.trace = current_traceparent() if _otel.current() is not None else None
        self.arrived = loop.time()
        self.future: asyncio.Future[Any] | None = None if stream else loop.create_future()
        # A streamed batch waits while any reader is this far behind (flow control
        # inside the replica, like the window between processes).
        self.chunks: asyncio.Queue[Any] | None = \
            asyncio.Queue(STREAM_AHEAD) if stream else None
        self.taken = False          # in a batch that started: cancelling no longer helps
        self.left = False           # a streaming caller stopped reading for good

    @property
    def gone(self) -> bool:
        return self.future is not None and self.future.done()


class _Stats:
    """Batch sizes of one method, for status and metrics."""

    __slots__ = ("batches", "calls", "last", "largest", "sizes", "size_cells", "wait_cells")

    def __init__(self) -> None:
        self.batches = 0
        self.calls = 0
        self.last = 0
        self.largest = 0
        self.sizes: dict[int, int] = {}
        # histograms since the replica last sent its metrics (fleet_batch_size,
        # fleet_batch_wait_seconds), drained by take_metrics
        self.size_cells = new_hist(SIZE_BUCKETS)
        self.wait_cells = new_hist(TIME_BUCKETS)

    def record(self, size: int, waited: float = 0.0) -> None:
        self.batches += 1
        self.calls += size
        self.last = size
        self.largest = max(self.largest, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1
        observe(self.size_cells, size, SIZE_BUCKETS)
        observe(self.wait_cells, waited, TIME_BUCKETS)

    def take_metrics(self) -> tuple[list[float], list[float]]:
        """The size and wait histograms since the last take; they start again at zero."""
        sizes, waits = self.size_cells, self.wait_cells
        self.size_cells = new_hist(SIZE_BUCKETS)
        self.wait_cells = new_hist(TIME_BUCKETS)
        return sizes, waits

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "calls": self.calls, "last_batch_size": self.last,
                "largest_batch_size": self.largest,
                "mean_batch_size": round(self.calls / self.batches, 2) if self.batches else 0,
                "batch_sizes": dict(sorted(self.sizes.items()))}


def batch_stats(instance: Any) -> dict[str, dict[str, Any]]:
    """Batch sizes of every batched method of a replica's instance (its object, or its
    function) that ran on this loop, by method name. A method's queue, and with it its
    counts, lives on the object it batches for and dies with it."""
    target = instance.func if isinstance(instance, functools.partial) else instance
    loop = asyncio.get_running_loop()
    found = getattr(target, "__dict__", {})
    return {q.name: q.stats.as_dict() for q in list(found.values())
            if isinstance(q, _BatchQueue) and q.loop is loop}


def take_batch_metrics(instance: Any) -> list[tuple[list[float], list[float]]]:
    """Each batched method's (size, wait) histograms since the last call, for the
    replica's metrics (see :func:`batch_stats` for which queues count)."""
    target = instance.func if isinstance(instance, functools.partial) else instance
    loop = asyncio.get_running_loop()
    found = getattr(target, "__dict__", {})
    return [q.stats.take_metrics() for q in list(found.values())
            if isinstance(q, _BatchQueue) and q.loop is loop]


class _BatchQueue:
    """The waiting calls of one batched method on one object, and the task that
    turns them into batches."""

    def __init__(self, fn: Callable[..., Any], owner: Any, name: str, max_batch_size: int,
                 timeout_s: float, max_concurrent: int, stream: bool) -> None:
        self.fn = fn
        self.owner = owner
        self.name = name
        self.max_size = max_batch_size
        self.timeout_s = timeout_s
        self.stream = stream
        self.loop = asyncio.get_running_loop()
        self.waiting: deque[_Entry] = deque()
        self.arrived = asyncio.Event()
        self.slots = asyncio.Semaphore(max_concurrent)
        self.stats = _Stats()
        self.running: set[asyncio.Task[None]] = set()
        self.multiplexed = False        # calls carried model ids: batches split by model
        self.task = self.loop.create_task(self._collect())

    def put(self, item: Any) -> _Entry:
        entry = _Entry(item, self.loop, self.stream)
        if entry.model:
            self.multiplexed = True
        self.waiting.append(entry)
        self.arrived.set()
        return entry

    def withdraw(self, entry: _Entry) -> None:
        """A caller gave up; if its batch has not started, it is not part of one."""
        chunks = entry.chunks
        if chunks is not None:
            entry.left = True       # its batch no longer waits for it to read
            while not chunks.empty():
                chunks.get_nowait()
        if not entry.taken:
            try:
                self.waiting.remove(entry)
            except ValueError:
                pass

    async def _wait_arrival(self, timeout: float | None) -> None:
        self.arrived.clear()
        if timeout is None:
            await self.arrived.wait()
            return
        try:
            await asyncio.wait_for(self.arrived.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _collect(self) -> None:
        waiting = self.waiting
        while True:
            await self.slots.acquire()
            try:
                while True:
                    while not waiting:
                        await self._wait_arrival(None)
                    # Wait for a full batch, but never past the oldest call's deadline.
                    deadline = waiting[0].arrived + self.timeout_s
                    while len(waiting) < self.max_size:
                        left = deadline - self.loop.time()
                        if left <= 0:
                            break
                        await self._wait_arrival(left)
                        if not waiting:
                            break
                    entries = self._take()
                    if entries:
                        break
            except BaseException:
                self.slots.release()
                raise
            task = self.loop.create_task(self._run(entries))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    def _take(self) -> list[_Entry]:
        """Up to max_size waiting calls for the oldest call's model, oldest first; calls
        for other models keep their place."""
        waiting = self.waiting
        while waiting and waiting[0].gone:
            waiting.popleft()
        if not waiting:
            return []
        model = waiting[0].model
        entries: list[_Entry] = []
        if not self.multiplexed:
            while waiting and len(entries) < self.max_size:
                entry = waiting.popleft()
                if not entry.gone:
                    entry.taken = True
                    entries.append(entry)
            return entries
        rest: deque[_Entry] = deque()
        for entry in waiting:
            if entry.gone:
                continue
            if entry.model == model and len(entries) < self.max_size:
                entry.taken = True
                entries.append(entry)
            else:
                rest.append(entry)
        waiting.clear()
        waiting.extend(rest)
        return entries

    def _call(self, items: list[Any]) -> Any:
        if self.owner is _NO_OWNER:
            return self.fn(items)
        return self.fn(self.owner, items)

    def _check(self, results: Any, n: int) -> list[Any]:
        try:
            size = len(results)
        except TypeError:
            raise TypeError(f"batched method {self.name} must return a list with one result "
                            f"per call; it returned {type(results).__name__} for a batch of "
                            f"{n} calls") from None
        if size != n:
            raise ValueError(f"batched method {self.name} returned {size} results for a batch "
                             f"of {n} calls; it must return exactly one result per call")
        return list(results)

    async def _run(self, entries: list[_Entry]) -> None:
        n = len(entries)
        self.stats.record(n, self.loop.time() - entries[0].arrived)
        tracer = _otel.current()
        span = None
        if tracer is not None:      # a fleet.batch span, linked to each call's span
            links = [lk for lk in (_otel.link(e.trace) for e in entries) if lk is not None]
            span = tracer.start_span("fleet.batch", links=links,
                                     attributes={"fleet.method": self.name,
                                                 "fleet.batch_size": n})
        # This task's context only; it was copied from whichever call started the queue.
        set_model_id(entries[0].model)
        try:
            if self.stream:
                await self._run_stream(entries)
            else:
                await self._run_once(entries)
        finally:
            if span is not None:
                span.end()
            self.slots.release()

    async def _run_once(self, entries: list[_Entry]) -> None:
        n = len(entries)
        try:
            items = [e.item for e in entries]
            joiner = getattr(type(self.owner), "_fleet_batch_joiner", None)
            if joiner is not None and self.fn.__name__ == "__call__":
                # An Open Inference Protocol model: one call with the tensors joined.
                joined, sizes = joiner.join(items)
                results = joiner.split(await self._call(joined), sizes)
            else:
                results = self._check(await self._call(items), n)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every caller must get an answer
            for e in entries:
                if e.future is not None and not e.future.done():
                    e.future.set_exception(exc)
            return
        for e, value in zip(entries, results, strict=True):
            if e.future is not None and not e.future.done():
                e.future.set_result(value)

    async def _run_stream(self, entries: list[_Entry]) -> None:
        n = len(entries)
        gen = self._call([e.item for e in entries])
        try:
            async for out in gen:
                # the batch goes at the pace of its slowest reader
                for e, value in zip(entries, self._check(out, n), strict=True):
                    await _put(e, value)
                if all(e.left for e in entries):
                    return              # no one reads any more: stop the generator
                await asyncio.sleep(0)  # a generator that never awaits lets others run
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every caller must get an answer
            for e in entries:
                await _put(e, _Failed(exc))
            return
        finally:
            await gen.aclose()
        for e in entries:
            await _put(e, _END)


async def _put(entry: _Entry, value: Any) -> None:
    chunks = entry.chunks
    assert chunks is not None
    if not entry.left:
        await chunks.put(value)


_NO_OWNER = object()


def _split_args(args: tuple[Any, ...], kwargs: dict[str, Any], name: str,
                is_method: bool) -> tuple[Any, Any]:
    if kwargs:
        raise TypeError(f"batched method {name} takes one positional argument per call, "
                        f"not keyword arguments ({', '.join(kwargs)})")
    want = 2 if is_method else 1
    if len(args) != want:
        raise TypeError(f"batched method {name} takes exactly one argument per call "
                        f"(got {len(args) - want + 1})")
    return (args[0], args[1]) if is_method else (_NO_OWNER, args[0])


def batch(_fn: F | None = None, *, max_batch_size: int = 10,
          batch_wait_timeout_s: float = 0.01, max_concurrent_batches: int = 1) -> Any:
    """Group concurrent calls of an ``async def`` method into one call with a list.

    The method takes a list of arguments and returns a list of results of the same
    length; each caller passes one argument and gets its own result. A batch runs when
    ``max_batch_size`` calls wait or the oldest has waited ``batch_wait_timeout_s``. An
    exception fails every call of its batch; an ``async def`` generator yields one list
    per step, and each caller streams its own element of each list.

    Example::

        @fleet.deployment
        class Model:
            @fleet.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
            async def __call__(self, inputs: list[str]) -> list[int]:
                return [len(x) for x in inputs]

        handle.remote("abc")   # -> 3, computed in a batch with its neighbours
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if batch_wait_timeout_s < 0:
        raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
    if max_concurrent_batches < 1:
        raise ValueError(f"max_concurrent_batches must be at least 1, "
                         f"got {max_concurrent_batches}")

    def wrap(fn: F) -> F:
        stream = inspect.isasyncgenfunction(fn)
        if not stream and not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@fleet.batch applies to an `async def` method or async "
                            f"generator, not {getattr(fn, '__qualname__', fn)!r}")
        params = list(inspect.signature(fn).parameters)
        is_method = len(params) >= 2 or (bool(params) and params[0] == "self")
        name = fn.__qualname__
        attr = f"_fleet_batch_{fn.__name__}_{id(fn)}"
        # A method's queue lives on the object it batches for; a function's on the
        # function fleet calls (the wrapper): batch_stats finds them there.
        holder: list[Any] = []

        def queue_for(owner: Any) -> _BatchQueue:
            place = holder[0].__dict__ if owner is _NO_OWNER else owner.__dict__
            q = place.get(attr)
            if q is None or q.loop is not asyncio.get_running_loop():
                q = _BatchQueue(fn, owner, name, max_batch_size, batch_wait_timeout_s,
                                max_concurrent_batches, stream)
                place[attr] = q
            return q

        if stream:
            @functools.wraps(fn)
            async def stream_wrapper(*args: Any, **kwargs: Any) -> Any:
                owner, item = _split_args(args, kwargs, name, is_method)
                q = queue_for(owner)
                entry = q.put(item)
                chunks = entry.chunks
                assert chunks is not None
                try:
                    while True:
                        value = await chunks.get()
                        if value is _END:
                            return
                        if isinstance(value, _Failed):
                            raise value.exc
                        yield value
                finally:
                    q.withdraw(entry)

            holder.append(stream_wrapper)
            return stream_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            owner, item = _split_args(args, kwargs, name, is_method)
            q = queue_for(owner)
            entry = q.put(item)
            assert entry.future is not None
            try:
                return await entry.future
            except asyncio.CancelledError:
                q.withdraw(entry)
                raise

        holder.append(wrapper)
        return wrapper  # type: ignore[return-value]

    if _fn is not None:
        return wrap(_fn)
    return wrap

