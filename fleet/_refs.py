"""``fleet.get`` and ``fleet.wait``: fetch or wait for many handle responses at once.

They take what ``handle.remote(...)`` returns (and the references a graph handle's
first ``await`` gives) with Ray's semantics: ``get`` keeps the order of its input and
raises the first error in that order; ``wait`` answers ``(ready, not_ready)``. In sync
code they block; in async code they return an awaitable (``await fleet.get(refs)``), so
the event loop running the calls is never blocked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from fleet._handle import DeploymentResponse, _Ref
from fleet.exceptions import GetTimeoutError


def _response(value: Any, where: str) -> DeploymentResponse:
    if isinstance(value, DeploymentResponse):
        return value
    if isinstance(value, _Ref):
        return value._resp
    raise TypeError(f"{where}: expected a DeploymentResponse (what handle.remote(...) "
                    f"returns), got {type(value).__name__}")


def _responses(refs: Any, fn: str) -> list[DeploymentResponse]:
    if not isinstance(refs, Sequence) or isinstance(refs, str | bytes):
        raise TypeError(f"fleet.{fn} expects a list of DeploymentResponses, got "
                        f"{type(refs).__name__}")
    return [_response(r, f"fleet.{fn}: item {i}") for i, r in enumerate(refs)]


def _check_timeout(timeout: float | None, fn: str) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
        raise ValueError(f"fleet.{fn}: timeout must be None or a number >= 0, got {timeout!r}")


def _in_async() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _done_indexes(resps: list[DeploymentResponse], num_returns: int,
                        timeout: float | None) -> set[int]:
    """On the calls' loop: the indexes of finished calls once num_returns finished or
    the timeout passed."""
    futs: dict[asyncio.Future[Any], int] = {}
    for i, r in enumerate(resps):
        if r._task is not None:
            fut = r._task
        else:
            assert r._cfut is not None
            fut = asyncio.wrap_future(r._cfut)
            # The caller reads the error from the response itself; this copy's must not
            # be reported as never retrieved.
            fut.add_done_callback(_retrieved)
        futs[fut] = i
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(futs)
    while pending:
        done_count = sum(1 for f in futs if f.done())
        if done_count >= num_returns:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=left,
                                        return_when=asyncio.FIRST_COMPLETED)
    return {i for f, i in futs.items() if f.done()}


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _on_calls_loop(resps: list[DeploymentResponse], num_returns: int,
                   timeout: float | None) -> Any:
    """_done_indexes run on the loop the calls run on: blocking in sync code, an
    awaitable in async code."""
    loops = {r._loop for r in resps}
    if len(loops) > 1:
        raise ValueError("the responses' calls run on different event loops (different "
                         "fleet instances, or async code on several loops): wait for each "
                         "loop's responses separately")
    loop = loops.pop()
    if loop.is_closed():
        # calls left behind by a loop that closed (an asyncio.run that ended): what
        # finished is ready, the rest never will be (reading it raises why)
        done = {i for i, r in enumerate(resps) if r._task is None or r._task.done()}
        return _maybe_async(done)
    coro = _done_indexes(resps, num_returns, timeout)
    if not _in_async():
        return asyncio.run_coroutine_threadsafe(coro, loop).result()
    if asyncio.get_running_loop() is loop:
        return coro
    return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


def wait(responses: Sequence[Any], num_returns: int = 1, timeout: float | None = None
         ) -> Any:
    """Wait until ``num_returns`` of the responses finished (a call that raised counts as
    finished) or ``timeout`` seconds passed; returns ``(ready, not_ready)``, two lists
    in the order of ``responses``, ``ready`` holding at most ``num_returns``.

    Example::

        responses = [handle.remote(i) for i in range(10)]
        ready, not_ready = fleet.wait(responses, num_returns=3, timeout=5)
        ready, not_ready = await fleet.wait(responses)        # in async code
    """
    resps = _responses(responses, "wait")
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) \
            or not 1 <= num_returns <= max(len(resps), 1):
        raise ValueError(f"fleet.wait: num_returns must be from 1 to the number of "
                         f"responses ({len(resps)}), got {num_returns!r}")
    if len({id(r) for r in resps}) != len(resps):
        raise ValueError("fleet.wait: the same response is listed twice")
    _check_timeout(timeout, "wait")
    items = list(responses)

    def split(done: set[int]) -> tuple[list[Any], list[Any]]:
        ready_idx = sorted(done)[:num_returns]
        chosen = set(ready_idx)
        return ([items[i] for i in ready_idx],
                [x for i, x in enumerate(items) if i not in chosen])

    if not resps:
        return _maybe_async(([], []))
    found = _on_calls_loop(resps, num_returns, timeout)
    if isinstance(found, set):
        return split(found)
    return _then(found, split)


def get(responses: Any, timeout: float | None = None) -> Any:
    """The results of responses: one response gives its value, a list gives a list of
    values in the same order. Raises the first call's error (in list order; for a
    cancelled call, :class:`fleet.RequestCancelledError`), and
    :class:`fleet.exceptions.GetTimeoutError` when the results are not all in after
    ``timeout`` seconds (the calls go on running).

    Example::

        values = fleet.get([handle.remote(i) for i in range(10)], timeout=30)
        values = await fleet.get(responses)                   # in async code
    """
    single = not isinstance(responses, Sequence) or isinstance(responses, str | bytes)
    resps = [_response(responses, "fleet.get")] if single else _responses(responses, "get")
    _check_timeout(timeout, "get")

    def values(done: set[int]) -> Any:
        if len(done) < len(resps):
            raise GetTimeoutError(f"fleet.get: {len(resps) - len(done)} of {len(resps)} "
                                  f"calls gave no result within timeout={timeout}; they go "
                                  "on running")
        out = [_value(r) for r in resps]
        return out[0] if single else out

    if not resps:
        return _maybe_async([])
    found = _on_calls_loop(resps, len(resps), timeout)
    if isinstance(found, set):
        return values(found)
    return _then(found, values)


def _value(resp: DeploymentResponse) -> Any:
    """The result of a finished call (its error raised)."""
    fut: Any = resp._task if resp._task is not None else resp._cfut
    if fut.cancelled():     # response.cancel(): what awaiting it raises, not CancelledError
        raise resp._cancelled_error()
    return fut.result()


async def _then(awaitable: Any, fn: Any) -> Any:
    return fn(await awaitable)


def _maybe_async(value: Any) -> Any:
    if _in_async():
        async def ready() -> Any:
            return value
        return ready()
    return value


__all__ = ["get", "wait"]
