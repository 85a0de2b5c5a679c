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


class ModelScope:
    """The models one replica holds: its loaders' caches and whom to tell when they
    change. The replica owns it, and it goes with the replica: nothing about models is
    kept per process, so replicas sharing one (the memory backend) share nothing."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.caches: list[ModelCache] = []
        # caches of loaders that are plain functions, by id() of the loader
        self.free: dict[int, ModelCache] = {}

    def held(self) -> list[dict[str, Any]]:
        """Every model this replica's loaders hold, for status."""
        return [m for cache in self.caches for m in cache.describe()]

    def held_ids(self) -> list[str]:
        """The ids this replica's loaders hold or are loading, for routers."""
        out: list[str] = []
        for cache in self.caches:
            out.extend(cache.models)
            out.extend(cache.loading)
        return out

    def close(self) -> None:
        """The replica stopped: forget its caches."""
        self.caches.clear()
        self.free.clear()


# The scope of the replica a call runs in, set in the task of each call that carries a
# model id (a loader that is a plain function has no owner to find it through).
_scope: contextvars.ContextVar[ModelScope | None] = contextvars.ContextVar(
    "fleet_model_scope", default=None)
# Where a replica's scope hangs on its user object, for loaders that are its methods.
_SCOPE_ATTR = "_fleet_model_scope"


def _call_scope() -> ModelScope | None:
    # A function, not the variable, in loaders: a class defined in __main__ travels by
    # value with its loader's closure, and a ContextVar cannot be pickled.
    return _scope.get()


def watch(owner: Any, scope: ModelScope) -> None:
    """Make scope the one of owner's loaders (owner: a replica's user object)."""
    try:
        vars(owner)[_SCOPE_ATTR] = scope
    except TypeError:           # no __dict__ (__slots__): its calls' context says
        pass


def enter_call(model_id: str, scope: ModelScope) -> None:
    """The current call (the replica calls it in the call's task) carries model_id and
    runs in scope's replica."""
    _model_id.set(model_id)
    _scope.set(scope)


class ModelCache:
    """The models one loader holds in one replica, least recently used first."""

    def __init__(self, fn: Callable[..., Any], owner: Any, name: str, max_models: int,
                 max_bytes: int | None, scope: ModelScope | None) -> None:
        self.fn = fn
        self.owner = owner
        self.name = name
        self.max_models = max_models
        self.max_bytes = max_bytes
        self.scope = scope
        self.loop = asyncio.get_running_loop()
        self.models: OrderedDict[str, _Loaded] = OrderedDict()
        self.loading: dict[str, asyncio.Task[Any]] = {}
        self.unloading: set[asyncio.Task[Any]] = set()     # async __del__ of evicted ones
        self.loads = 0
        self.evictions = 0
        if scope is not None:
            scope.caches.append(self)

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
        if self.scope is not None:
            self.scope.on_change()
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
            self.unloading.add(task)
            task.add_done_callback(self.unloading.discard)

    def describe(self) -> list[dict[str, Any]]:
        """The held models, most recently used last, for status."""
        return [{"model_id": mid, "loader": self.name,
                 "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(m.loaded_at)),
                 "load_s": round(m.load_s, 4), "bytes": m.bytes, "calls": m.calls}
                for mid, m in self.models.items()]


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
            # The replica's scope: through its user object for a method (else, as for a
            # plain function, through the model call's context); none outside a replica.
            if owner is _NO_OWNER:
                scope = _call_scope()
                caches = scope.free if scope is not None else free
                cache = caches.get(id(fn))
            else:
                scope = owner.__dict__.get(_SCOPE_ATTR) or _call_scope()
                cache = owner.__dict__.get(attr)
            if cache is None or cache.loop is not asyncio.get_running_loop():
                cache = ModelCache(fn, owner, name, max_num_models_per_replica,
                                   max_model_memory_bytes, scope)
                if owner is _NO_OWNER:
                    caches[id(fn)] = cache
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
