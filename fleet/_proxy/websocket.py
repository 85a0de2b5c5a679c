"""Websockets through the proxy: one streaming call per connection.

The replica's ASGI app sends its messages (accept, send, close) back as CHUNK frames;
the client's messages go to the running call as DATA frames. Only websocket scopes
import this module, so plain HTTP requests pay nothing for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from fleet._types import CallMeta
from fleet._wire import frames
from fleet._wire.channel import Pending
from fleet.exceptions import FleetError

if TYPE_CHECKING:
    from fleet._proxy.http import HTTPProxy

log = logging.getLogger("fleet.proxy")

_META: CallMeta = {"http": 1, "ws": 1}
_TRY_AGAIN = 1013     # "try again later": no replica could take the connection
_INTERNAL = 1011      # the app failed
# After the client went away the app gets websocket.disconnect and this long to end by
# itself (FastAPI: WebSocketDisconnect, then its cleanup); an app that is not reading
# is then cancelled, so a dead connection never keeps a replica slot.
DISCONNECT_GRACE_S = 1.0


async def proxy_websocket(proxy: HTTPProxy, scope: dict[str, Any], receive: Any,
                          send: Any) -> None:
    """Serve one websocket connection through the route's ingress replica."""
    await receive()  # websocket.connect
    path = proxy.local_path(scope)
    hit = proxy.routes.match(path)
    if hit is None:
        await send({"type": "websocket.close", "code": 1000, "reason": ""})  # -> HTTP 403
        return
    prefix, info = hit
    sub = proxy.sub_scope(scope, path, prefix)
    if "subprotocols" in scope:
        sub["subprotocols"] = scope["subprotocols"]
    runtime = proxy.runtime
    router = runtime.router(info["app"], info["ingress"])
    try:
        slot, pending = await runtime.start_call(router, "__call__", ((sub, b""),), {},
                                                 _META, True)
    except FleetError as exc:
        log.warning("websocket %s refused: %s", path, exc)
        await send({"type": "websocket.close", "code": _TRY_AGAIN, "reason": ""})
        return
    pump: asyncio.Task[None] | None = None
    accepted = False
    try:
        while True:
            kind, message = await pending.next()
            if kind == frames.OK:
                if accepted:
                    with contextlib.suppress(Exception):
                        await send({"type": "websocket.close", "code": 1000, "reason": ""})
                return
            await send(message)
            mtype = message["type"]
            if mtype == "websocket.accept" and pump is None:
                accepted = True
                pump = asyncio.get_running_loop().create_task(_pump(receive, pending))
            elif mtype == "websocket.close":
                return
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("websocket %s of app %s ended: %s: %s", path, info["app"],
                    type(exc).__name__, exc)
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": _INTERNAL, "reason": ""})
    finally:
        if pump is not None:
            pump.cancel()
        pending.cancel()
        router.release(slot)


async def _pump(receive: Any, pending: Pending) -> None:
    """Client messages into the call, up to and including the disconnect; then, if
    the app is still running after the grace, cancel its call and end the connection."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            pending.send_data(message)
            break
        # Waits while the app is a window behind; uvicorn then stops reading the
        # socket. Like an app under uvicorn itself, one that never reads again does not
        # see the client leave until the connection's keepalive pings fail.
        await pending.send(message)
    await asyncio.sleep(DISCONNECT_GRACE_S)   # cancelled if the call ends in time
    pending.cancel()
    pending.deliver(frames.OK, None)           # wakes proxy_websocket: it is over
