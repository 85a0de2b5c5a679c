"""Traffic policies for the proxies' requests (the policy logic is ``fleet/_traffic.py``,
shared with application handles): what an HTTP request or a gRPC call copies to the
shadows, and which application it goes to."""

from __future__ import annotations

from typing import Any

from fleet._runtime import Runtime
from fleet._traffic import choose, copy, route_app, shadows_in_flight
from fleet._types import CallMeta

_HTTP_META: CallMeta = {"http": 1}


def route_http(runtime: Runtime, prefix: str, app: str, ingress: str, method: str,
               scope: dict[str, Any], body: bytes) -> tuple[str, str]:
    """:func:`choose` for an HTTP request; shadows get the same scope and body."""
    if not runtime.tables or not runtime.tables["traffic"]:
        return app, ingress

    async def shadow(s_app: str, s_ingress: str) -> None:
        await copy(runtime, s_app, s_ingress, method, ((scope, body),), _HTTP_META, True)

    return choose(runtime, prefix, app, ingress, shadow)


def route_grpc(runtime: Runtime, app: str, ingress: str, rpc: str, request: bytes | None,
               meta: CallMeta, stream: bool) -> tuple[str, str]:
    """:func:`route_app` for a gRPC call addressed to ``app``: the policy of the route
    that app serves splits it, and its shadows get a copy of a call whose request is one
    message (``request`` not None; a request stream is not copied)."""
    tables = runtime.tables
    if tables is None or not tables["traffic"]:
        return app, ingress
    shadow = None
    if request is not None:
        async def shadow(s_app: str, s_ingress: str) -> None:
            await copy(runtime, s_app, s_ingress, rpc, (request,), meta, stream)
    return route_app(runtime, app, ingress, shadow)


__all__ = ["choose", "route_grpc", "route_http", "shadows_in_flight"]
