"""Model multiplexing: one deployment serves many models, each replica holding a few.

``@fleet.multiplexed`` wraps an async loader ``(model_id) -> model`` in a per-replica
LRU cache. Concurrent requests for one id share one load; a load that would pass
``max_num_models_per_replica`` (or ``max_model_memory_bytes``) evicts the least
recently used models first. The request's model id (``fleet.get_multiplexed_model_id()``)
comes from the caller: an HTTP header, gRPC metadata or ``handle.options``.

Routing: every replica tells the callers that sent it model calls which models it
holds (a CTRL frame on their data connection, sent only when the set changes), and the
controller too, for ``fleet status``. Routers prefer a replica holding the model.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# The HTTP header and gRPC metadata key carrying a request's model id (Ray Serve's name;
# HTTP also accepts it with dashes).
MODEL_HEADER = "serve_multiplexed_model_id"
GRPC_MODEL_KEY = "multiplexed_model_id"

_model_id: contextvars.ContextVar[str] = contextvars.ContextVar("fleet_model_id", default="")

_NO_OWNER = object()


def get_multiplexed_model_id() -> str:
    """The model id of the request being served, or ``""`` when it carries none.

    Inside a replica, call it from the request's own code (a method, or the loader).
    The id comes from the ``serve_multiplexed_model_id`` HTTP header (or
    ``serve-multiplexed-model-id``), the ``multiplexed_model_id`` gRPC metadata key, or
    ``handle.options(multiplexed_model_id=...)``.

    Example::

        @fleet.deployment
        class Models:
            @fleet.multiplexed(max_num_models_per_replica=2)
            async def get_model(self, model_id: str):
                return load(model_id)

            async def __call__(self, request):
                model = await self.get_model(fleet.get_multiplexed_model_id())
                return model.predict(await request.json())
    """
    return _model_id.get()


def set_model_id(model_id: str) -> None:
    """Make model_id the current request's (the replica calls it in the request's task)."""
    _model_id.set(model_id)


class _Loaded:
    """One model in a replica's cache."""

    __slots__ = ("model", "loaded_at", "load_s", "bytes", "calls")

    def __init__(self, model: Any, load_s: float, size: int) -> None:
        self.model = model
        self.loaded_at = time.time()
        self.load_s = load_s
        self.bytes = size
        self.calls = 0


class ModelCache:
    """The models one loader holds in one replica, least recently used first."""

    def __init__(self, fn: Callable[..., Any], owner: Any, name: str, max_models: int,
                 max_bytes: int | None) -> None:
        self.fn = fn
        self.owner = owner
        self.name = name
        self.max_models = max_models
        self.max_bytes = max_bytes
        self.loop = asyncio.get_running_loop()
        self.models: OrderedDict[str, _Loaded] = OrderedDict()
        self.loading: dict[str, asyncio.Task[Any]] = {}
        self.loads = 0
        self.evictions = 0
        _caches.setdefault(id(owner), []).append(self)

    async def get(self, model_id: str) -> Any:
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(
                f"{self.name} needs a model id (a non-empty string), got {model_id!r}: send "
                f"the {MODEL_HEADER!r} HTTP header, the {GRPC_MODEL_KEY!r} gRPC metadata "
                "key, or call through handle.options(multiplexed_model_id=...)")
        held = self.models.get(model_id)
        if held is not None:
            self.models.move_to_end(model_id)
            held.calls += 1
            return held.model
        task = self.loading.get(model_id)
        if task is None:
            # The load is a task of its own: a caller that gives up does not cancel it
            # for the others waiting on the same id.
            task = self.loop.create_task(self._load(model_id))
            self.loading[model_id] = task
        return await asyncio.shield(task)

    async def _load(self, model_id: str) -> Any:
        token = _model_id.set(model_id)
        try:
            before = _rss() if self.max_bytes is not None else 0
            started = time.perf_counter()
            if self.owner is _NO_OWNER:
                model = await self.fn(model_id)
            else:
                model = await self.fn(self.owner, model_id)
            load_s = time.perf_counter() - started
            size = max(0, _rss() - before) if self.max_bytes is not None else 0
        finally:
            _model_id.reset(token)
            self.loading.pop(model_id, None)
        self.loads += 1
        loaded = _Loaded(model, load_s, size)
        loaded.calls = 1
        self.models[model_id] = loaded
        self._evict()
        _changed(self.owner)
        return model

    def _evict(self) -> None:
        models = self.models
        while len(models) > self.max_models or (
                self.max_bytes is not None and len(models) > 1
                and sum(m.bytes for m in models.values()) > self.max_bytes):
            _, old = models.popitem(last=False)
            self.evictions += 1
            self._unload(old.model)

    def _unload(self, model: Any) -> None:
        # A sync __del__ runs when the last reference goes: here, or when the requests
        # still using the model finish. An async one is awaited in the background.
        fn = getattr(type(model), "__del__", None)
        if fn is not None and inspect.iscoroutinefunction(fn):
            task = self.loop.create_task(fn(model))
            _unloading.add(task)
            task.add_done_callback(_unloading.discard)

    def describe(self) -> list[dict[str, Any]]:
        """The held models, most recently used last, for status."""
        return [{"model_id": mid, "loader": self.name,
                 "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(m.loaded_at)),
                 "load_s": round(m.load_s, 4), "bytes": m.bytes, "calls": m.calls}
                for mid, m in self.models.items()]


_unloading: set[asyncio.Task[Any]] = set()
# Caches and change listeners by id() of the object owning the loader (the replica's
# user object; 0-keyed _NO_OWNER for a loader that is a plain function).
_caches: dict[int, list[ModelCache]] = {}
_watchers: dict[int, Callable[[], None]] = {}


def watch(owner: Any, on_change: Callable[[], None]) -> None:
    """Call on_change whenever a loader of owner (a replica's user object) loads or
    evicts; loaders that are plain functions report to the last watcher too."""
    _watchers[id(owner)] = on_change
    _watchers[id(_NO_OWNER)] = on_change


def unwatch(owner: Any) -> None:
    """Forget owner's caches and listener (its replica stopped)."""
    _watchers.pop(id(owner), None)
    _caches.pop(id(owner), None)


def held(owner: Any) -> list[dict[str, Any]]:
    """Every model owner's loaders hold (and the plain-function loaders')."""
    out: list[dict[str, Any]] = []
    for key in (id(owner), id(_NO_OWNER)):
        for cache in _caches.get(key, ()):
            out.extend(cache.describe())
    return out


def held_ids(owner: Any) -> list[str]:
    """The ids owner's loaders hold or are loading, for routers."""
    out: list[str] = []
    for key in (id(owner), id(_NO_OWNER)):
        for cache in _caches.get(key, ()):
            out.extend(cache.models)
            out.extend(cache.loading)
    return out


def _changed(owner: Any) -> None:
    cb = _watchers.get(id(owner))
    if cb is not None:
        cb()


def _rss() -> int:
    import psutil  # only loaders with max_model_memory_bytes measure: not on every start
    return int(psutil.Process().memory_info().rss)


def multiplexed(_fn: F | None = None, *, max_num_models_per_replica: int = 3,
                max_model_memory_bytes: int | None = None) -> Any:
    """Turn an ``async def`` loader ``(self, model_id) -> model`` into a per-replica
    cache of at most ``max_num_models_per_replica`` models, evicting the least recently
    used. Calling the loader returns the cached model; concurrent calls for one id load
    it once. An evicted model is dropped (its ``__del__`` runs once no request uses it;
    an ``async def __del__`` is awaited).

    ``max_model_memory_bytes`` also evicts by memory: each model's size is the growth of
    the replica's resident memory while it loaded, and the least recently used models
    go until the rest fit (the newest is always kept).

    Routers send a request to a replica that holds its model when one has room, so
    each model stays loaded in few replicas.

    Example::

        @fleet.deployment(num_replicas=2)
        class Models:
            @fleet.multiplexed(max_num_models_per_replica=3)
            async def get_model(self, model_id: str):
                return train_or_load(model_id)

            async def __call__(self, x):
                model = await self.get_model(fleet.get_multiplexed_model_id())
                return model.predict(x)

        handle.options(multiplexed_model_id="a").remote(x)
    """
    if not isinstance(max_num_models_per_replica, int) or max_num_models_per_replica < 1:
        raise ValueError("max_num_models_per_replica must be an integer >= 1, got "
                         f"{max_num_models_per_replica!r}")
    if max_model_memory_bytes is not None and (
            not isinstance(max_model_memory_bytes, int) or max_model_memory_bytes < 1):
        raise ValueError("max_model_memory_bytes must be a positive integer (bytes) or None, "
                         f"got {max_model_memory_bytes!r}")

    def wrap(fn: F) -> F:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@fleet.multiplexed applies to an `async def` loader taking a "
                            f"model id, not {getattr(fn, '__qualname__', fn)!r}")
        params = list(inspect.signature(fn).parameters)
        is_method = len(params) >= 2 or (bool(params) and params[0] == "self")
        name = fn.__qualname__
        attr = f"_fleet_models_{fn.__name__}_{id(fn)}"
        free: dict[int, ModelCache] = {}

        def cache_for(owner: Any) -> ModelCache:
            if owner is _NO_OWNER:
                cache = free.get(0)
            else:
                cache = owner.__dict__.get(attr)
            if cache is None or cache.loop is not asyncio.get_running_loop():
                cache = ModelCache(fn, owner, name, max_num_models_per_replica,
                                   max_model_memory_bytes)
                if owner is _NO_OWNER:
                    free[0] = cache
                else:
                    owner.__dict__[attr] = cache
            return cache

        @functools.wraps(fn)
        async def loader(*args: Any, **kwargs: Any) -> Any:
            if kwargs or len(args) != (2 if is_method else 1):
                raise TypeError(f"multiplexed loader {name} takes one argument, the model "
                                "id, e.g. await self.get_model(fleet.get_multiplexed_model_id())")
            if is_method:
                return await cache_for(args[0]).get(args[1])
            return await cache_for(_NO_OWNER).get(args[0])

        loader._fleet_multiplexed = cache_for  # type: ignore[attr-defined]
        return loader  # type: ignore[return-value]

    if _fn is not None:
        return wrap(_fn)
    return wrap
