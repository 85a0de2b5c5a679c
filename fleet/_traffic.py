"""Traffic policies on the request path: weighted splits across applications and
shadow copies whose answers are dropped, for every caller that follows them (the
proxies, and handles to an application from ``fleet.get_app_handle`` or ``fleet.run``).

The controller publishes ``tables["traffic"]`` (see ``fleet/_controller/traffic.py``):
per route prefix, ``split`` as ``[app, ingress, cumulative share]`` and ``shadow`` as
``[app, ingress, fraction]``. A route without a policy costs one dict lookup.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fleet._types import CallMeta
from fleet._wire import frames

if TYPE_CHECKING:
    from fleet._runtime import Runtime

log = logging.getLogger("fleet.traffic")

# Shadow copies in flight per runtime (runtime.shadows); past it, copies are skipped so
# a slow shadow application can never pile up memory in the caller.
MAX_SHADOW_INFLIGHT = 256
SHADOW_TIMEOUT_S = 60.0


def choose(runtime: Runtime, prefix: str, app: str, ingress: str,
           shadow: Callable[[str, str], Coroutine[Any, Any, None]] | None = None
           ) -> tuple[str, str]:
    """The (app, ingress) this request goes to; starts its shadow copies via shadow()."""
    tables = runtime.tables
    traffic = tables["traffic"] if tables is not None else None
    if not traffic:
        return app, ingress
    policy = traffic.get(prefix)
    if policy is None:
        return app, ingress
    if shadow is not None:
        shadows = runtime.shadows
        for s_app, s_ingress, fraction in policy["shadow"]:
            if random.random() < fraction and len(shadows) < MAX_SHADOW_INFLIGHT:
                task = runtime.loop.create_task(_quiet(shadow(s_app, s_ingress), s_app))
                shadows.add(task)
                task.add_done_callback(shadows.discard)
    split = policy["split"]
    if split:
        i = bisect.bisect_right([c for _, _, c in split], random.random())
        chosen = split[min(i, len(split) - 1)]
        return chosen[0], chosen[1]
    return app, ingress


async def _quiet(coro: Coroutine[Any, Any, None], app: str) -> None:
    try:
        await asyncio.wait_for(coro, SHADOW_TIMEOUT_S)
    except Exception as exc:  # a shadow's failure is never the client's
        log.debug("shadow copy to application %s failed: %s", app, exc)


async def copy(runtime: Runtime, app: str, ingress: str, method: str, args: tuple[Any, ...],
               meta: CallMeta | None, stream: bool,
               kwargs: dict[str, Any] | None = None) -> None:
    """One shadow call, its answer read to the end and dropped."""
    router = runtime.router(app, ingress)
    slot, pending = await runtime.start_call(router, method, args, kwargs or {}, meta, stream)
    try:
        if not stream:
            await pending.result()
            return
        while True:
            kind, _ = await pending.next()
            if kind != frames.CHUNK:       # OK or an error ends the call
                return
    except asyncio.CancelledError:
        pending.cancel()
        raise
    finally:
        router.release(slot)


def shadows_in_flight(runtime: Runtime) -> int:
    """Shadow copies this runtime still runs."""
    return len(runtime.shadows)


def route_app(runtime: Runtime, app: str, ingress: str,
              shadow: Callable[[str, str], Coroutine[Any, Any, None]] | None
              ) -> tuple[str, str]:
    """:func:`choose` for a call addressed to an application (not to a route): the
    policy of the route that application serves applies."""
    tables = runtime.tables
    if tables is None or not tables["traffic"]:
        return app, ingress
    for prefix, info in tables["routes"].items():
        if info["app"] == app and info["ingress"] == ingress and prefix in tables["traffic"]:
            return choose(runtime, prefix, app, ingress, shadow)
    return app, ingress


def route_handle(runtime: Runtime, app: str, ingress: str, method: str,
                 args: tuple[Any, ...], kwargs: dict[str, Any],
                 meta: CallMeta | None, stream: bool) -> tuple[str, str]:
    """:func:`route_app` for a handle call; shadows get the same arguments."""
    async def shadow(s_app: str, s_ingress: str) -> None:
        await copy(runtime, s_app, s_ingress, method, args, meta, stream, kwargs)
    return route_app(runtime, app, ingress, shadow)
