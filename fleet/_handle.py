"""DeploymentHandle and DeploymentResponse: calling a deployment from Python.

A handle is a name (app, deployment) plus call options; it finds the process's
runtime when used, so it pickles cheaply and works in the driver, in replicas and in
threads. Calls run on the runtime's event loop; sync code waits with ``.result()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from fleet import _crossing
from fleet import _runtime as _runtime_mod

_UNSET: Any = object()


@dataclass(frozen=True)
class _CallOptions:
    method_name: str = "__call__"
    stream: bool = False
    timeout_s: float | None = None
    http_headers: dict[str, str] = field(default_factory=dict)
    legacy_refs: bool = False
    # A handle to an application (fleet.get_app_handle, fleet.run) follows the traffic
    # policy of the route that application serves, as HTTP and gRPC calls do.
    follow_traffic: bool = False
    multiplexed_model_id: str = ""


def _runtime() -> Any:
    # the caller's own loop's satellite when it runs one (no thread crossing per call)
    return _runtime_mod.for_caller(_runtime_mod.current())


class DeploymentHandle:
    """A client for one deployment. ``handle.remote(...)`` calls ``__call__``;
    ``handle.other.remote(...)`` or ``handle.options(method_name="other")`` another method.

    Example::

        resp = handle.remote(1)        # starts the call at once
        value = resp.result()          # sync code
        value = await handle.remote(1) # async code
    """

    def __init__(self, deployment_name: str, app_name: str = "default",
                 _options: _CallOptions | None = None) -> None:
        self.deployment_name = deployment_name
        self.app_name = app_name
        self._opts = _options or _CallOptions()

    def options(self, *, method_name: str = _UNSET, stream: bool = _UNSET,
                timeout_s: float | None = _UNSET, http_headers: dict[str, str] = _UNSET,
                multiplexed_model_id: str = _UNSET) -> DeploymentHandle:
        """A copy of this handle with other call options. ``multiplexed_model_id``
        sends the calls to a replica holding that model (see :func:`fleet.multiplexed`)."""
        changes: dict[str, Any] = {}
        if method_name is not _UNSET:
            changes["method_name"] = method_name
        if stream is not _UNSET:
            changes["stream"] = bool(stream)
        if timeout_s is not _UNSET:
            if timeout_s is not None and timeout_s <= 0:
                raise ValueError(f"timeout_s must be positive, got {timeout_s}")
            changes["timeout_s"] = timeout_s
        if http_headers is not _UNSET:
            changes["http_headers"] = dict(http_headers)
        if multiplexed_model_id is not _UNSET:
            if not isinstance(multiplexed_model_id, str):
                raise TypeError("multiplexed_model_id must be a string (the model id), got "
                                f"{type(multiplexed_model_id).__name__}")
            changes["multiplexed_model_id"] = multiplexed_model_id
        return DeploymentHandle(self.deployment_name, self.app_name,
                                replace(self._opts, **changes))

    def _with_legacy_refs(self) -> DeploymentHandle:
        return DeploymentHandle(self.deployment_name, self.app_name,
                                replace(self._opts, legacy_refs=True))

    def _following_traffic(self) -> DeploymentHandle:
        return DeploymentHandle(self.deployment_name, self.app_name,
                                replace(self._opts, follow_traffic=True))

    def __getattr__(self, name: str) -> DeploymentHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Start a call; returns a DeploymentResponse (or a DeploymentResponseGenerator
        when the handle streams)."""
        rt = _runtime()
        coro_args = (self.app_name, self.deployment_name, self._opts, args, kwargs)
        if self._opts.stream:
            return DeploymentResponseGenerator(rt, coro_args)
        return DeploymentResponse(rt, coro_args)

    def __reduce__(self) -> Any:
        return (DeploymentHandle, (self.deployment_name, self.app_name, self._opts))

    def __repr__(self) -> str:
        return (f"DeploymentHandle(deployment={self.deployment_name!r}, "
                f"app={self.app_name!r}, method={self._opts.method_name!r})")


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class DeploymentResponse:
    """The answer to one call: ``await resp`` in async code, ``resp.result()`` in sync."""

    __slots__ = ("_task", "_cfut", "_loop", "_legacy", "_call", "_rt", "_coro", "_args")

    def __init__(self, rt: Any, call: tuple[Any, ...]) -> None:
        self._loop: asyncio.AbstractEventLoop = rt.loop
        self._legacy = call[2].legacy_refs
        self._call = call[:3]
        self._rt = rt
        # a satellite's call and its arguments, until it is known to run on that loop
        self._coro: Any = None
        self._args: tuple[Any, ...] | None = None
        self._task: asyncio.Future[Any] | None = None
        self._cfut: concurrent.futures.Future[Any] | None = None
        coro = _call_coro(rt, call)
        if _on_loop(self._loop):
            self._task = self._loop.create_task(coro)
            if rt.parent is not None:
                self._coro, self._args = coro, call
        else:
            self._cfut = _crossing.submit(self._loop, coro)

    def _off_this_loop(self) -> bool:
        """Move a satellite's call that has not started yet to the instance's runtime,
        for code that blocks this loop waiting for it (``.result()`` in a notebook cell,
        which runs on a loop); whether it was moved."""
        coro, call = self._coro, self._args
        if coro is None or call is None \
                or inspect.getcoroutinestate(coro) != inspect.CORO_CREATED:
            return False
        assert self._task is not None
        self._task.cancel()             # it never runs: its coroutine is only closed
        self._coro = self._args = None
        rt = self._rt = self._rt.parent
        self._loop = rt.loop
        self._task = None
        coro = _call_coro(rt, call)
        self._cfut = _crossing.submit(self._loop, coro)
        return True

    def __await__(self) -> Generator[Any, None, Any]:
        if self._legacy:
            return _ready(_Ref(self))
        return self._wait().__await__()

    async def _wait(self) -> Any:
        try:
            if self._task is not None:
                if _on_loop(self._loop):
                    self._coro = self._args = None  # awaited where it runs: stays there
                    return await self._task
                if self._loop.is_closed():
                    return self._left_behind()
                # awaited from another loop than the one running the call
                return await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(_await_task(self._task), self._loop))
            assert self._cfut is not None
            return await _crossing.wrap(self._cfut, asyncio.get_running_loop())
        except asyncio.CancelledError:
            if self._cancelled():       # the call was cancelled, not the one awaiting it
                raise self._cancelled_error() from None
            raise

    def _cancelled(self) -> bool:
        fut = self._task if self._task is not None else self._cfut
        return fut is not None and fut.cancelled()

    def _left_behind(self) -> Any:
        """The outcome of a call whose loop (a satellite's) has closed since."""
        assert self._task is not None
        if self._task.done() and not self._task.cancelled():
            return self._task.result()
        from fleet.exceptions import RequestCancelledError
        app, deployment, opts = self._call
        raise RequestCancelledError(
            f"the call to {deployment}.{opts.method_name} (application {app!r}) was "
            "cancelled when the event loop that started it closed; await it on that "
            "loop, or start it from sync code")

    def _cancelled_error(self) -> Exception:
        from fleet.exceptions import RequestCancelledError
        app, deployment, opts = self._call
        return RequestCancelledError(f"the call to {deployment}.{opts.method_name} "
                                     f"(application {app!r}) was cancelled by its caller")

    def result(self, timeout_s: float | None = None) -> Any:
        """Block until the call finishes; raises its error. Not for use in async code."""
        if _on_loop(self._loop) and not self._off_this_loop():
            raise RuntimeError("DeploymentResponse.result() blocks and cannot run on the "
                               "event loop serving the call; use `await response` instead")
        fut = self._cfut
        if fut is None:
            assert self._task is not None
            if self._loop.is_closed():
                # started on an event loop that has closed since (an asyncio.run that
                # ended): the call ended with it, finished or not
                return self._left_behind()
            fut = asyncio.run_coroutine_threadsafe(_await_task(self._task), self._loop)
            self._cfut = fut
        try:
            return fut.result(timeout_s)
        except concurrent.futures.CancelledError:
            if self._cancelled():
                raise self._cancelled_error() from None
            raise
        except concurrent.futures.TimeoutError:
            if fut.done():      # the call's own error: a TimeoutError since Python 3.11
                raise
            from fleet.exceptions import RequestTimeoutError
            app, deployment, opts = self._call
            raise RequestTimeoutError(
                f"call to {deployment}.{opts.method_name} (application {app!r}) gave no "
                f"result within result(timeout_s={timeout_s}); it goes on running (cancel "
                "it with response.cancel(), or bound it with handle.options(timeout_s=...))"
            ) from None

    def cancel(self) -> None:
        """Cancel the call; the replica's task is cancelled too."""
        if self._task is not None:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._task.cancel)
        elif self._cfut is not None:
            self._cfut.cancel()

    async def _to_value(self) -> Any:
        return await self._wait()


def _has_responses(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call passes DeploymentResponses, whose values must be awaited first."""
    return (any(isinstance(a, DeploymentResponse) for a in args)
            or (bool(kwargs) and any(isinstance(v, DeploymentResponse)
                                     for v in kwargs.values())))


async def _resolve(args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Await DeploymentResponses passed as arguments, so their values are delivered."""
    args = tuple([await a._to_value() if isinstance(a, DeploymentResponse) else a
                  for a in args])
    kwargs = {k: (await v._to_value() if isinstance(v, DeploymentResponse) else v)
              for k, v in kwargs.items()}
    return args, kwargs


def _call_coro(rt: Any, call: tuple[Any, ...]) -> Any:
    """The coroutine that makes call through rt (resolving responses passed in it)."""
    return _call_resolved(rt, call) if _has_responses(call[3], call[4]) else rt.call(*call)


async def _call_resolved(rt: Any, call: tuple[Any, ...]) -> Any:
    app, deployment, opts, args, kwargs = call
    args, kwargs = await _resolve(args, kwargs)
    return await rt.call(app, deployment, opts, args, kwargs)


async def _await_task(task: asyncio.Future[Any]) -> Any:
    return await task


def _ready(value: Any) -> Generator[Any, None, Any]:
    return value
    yield  # pragma: no cover - makes this a generator


class _Ref:
    """What awaiting a graph handle's call gives: await it again for the value."""

    def __init__(self, resp: DeploymentResponse) -> None:
        self._resp = resp

    def __await__(self) -> Generator[Any, None, Any]:
        return self._resp._wait().__await__()


_END = object()


class DeploymentResponseGenerator:
    """A streamed answer: iterate with ``for`` in sync code or ``async for`` in async code."""

    def __init__(self, rt: Any, call: tuple[Any, ...]) -> None:
        self._rt = rt
        self._loop: asyncio.AbstractEventLoop = rt.loop
        self._stream: Any = None
        self._call = call
        self._lock = threading.Lock()

    async def _open(self) -> Any:
        if self._stream is None:
            app, deployment, opts, args, kwargs = self._call
            if _has_responses(args, kwargs):
                args, kwargs = await _resolve(args, kwargs)
            self._stream = await self._rt.open_stream(app, deployment, opts, args, kwargs)
        return self._stream

    async def _next(self) -> Any:
        stream = await self._open()
        return await stream.next_item(_END)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        try:
            while True:
                if _on_loop(self._loop):
                    item = await self._next()
                else:
                    item = await asyncio.wrap_future(
                        asyncio.run_coroutine_threadsafe(self._next(), self._loop))
                if item is _END:
                    return
                yield item
        finally:
            self.cancel()   # left early (break, error): free the replica

    def __iter__(self) -> Iterator[Any]:
        if _on_loop(self._loop) and self._stream is None \
                and getattr(self._rt, "parent", None) is not None:
            # a satellite's stream iterated by blocking code on its loop (a notebook
            # cell): nothing was sent yet, so the instance's runtime serves it instead
            self._rt = self._rt.parent
            self._loop = self._rt.loop
        if _on_loop(self._loop):
            raise RuntimeError("iterate a streaming response with `async for` on the event "
                               "loop serving it")
        try:
            while True:
                item = asyncio.run_coroutine_threadsafe(self._next(), self._loop).result()
                if item is _END:
                    return
                yield item
        finally:
            self.cancel()   # left early (break, error): free the replica

    def cancel(self) -> None:
        """Stop the stream; the replica's generator is cancelled."""
        if self._stream is not None:
            self._loop.call_soon_threadsafe(self._stream.close)
