"""HTTP inside the replica: a proxied request becomes an ASGI call to the user's code."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from fleet.exceptions import MethodNotFoundError

if TYPE_CHECKING:
    from fleet._replica.replica import Replica
    from fleet._wire.listener import ServerConnection


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"a value of type {type(value).__qualname__} cannot be turned into JSON; "
                    "return str, bytes, a JSON-able value or a starlette Response")


def to_response(result: Any) -> Response:
    """The HTTP response for a method's return value."""
    if isinstance(result, Response):
        return result
    if isinstance(result, str):
        return PlainTextResponse(result)
    if isinstance(result, bytes | bytearray | memoryview):
        return Response(bytes(result), media_type="application/octet-stream")
    if inspect.isasyncgen(result) or inspect.isgenerator(result):
        return StreamingResponse(_encode_chunks(result))
    body = json.dumps(result, default=_jsonable, separators=(",", ":")).encode()
    return Response(body, media_type="application/json")


async def _encode_chunks(gen: Any) -> Any:
    if inspect.isasyncgen(gen):
        async for item in gen:
            yield _chunk_bytes(item)
    else:
        for item in gen:
            yield _chunk_bytes(item)


def _chunk_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    return json.dumps(item, default=_jsonable).encode()


class _Sender:
    """Turns ASGI send messages into reply frames: one OK for a whole response,
    or CHUNK frames then OK for a streamed one."""

    __slots__ = ("conn", "call_id", "status", "headers", "streaming", "finished")

    def __init__(self, conn: ServerConnection, call_id: int) -> None:
        self.conn = conn
        self.call_id = call_id
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = []
        self.streaming = False
        self.finished = False

    async def __call__(self, message: dict[str, Any]) -> None:
        t = message["type"]
        if t == "http.response.start":
            self.status = message["status"]
            self.headers = message.get("headers", [])
        elif t == "http.response.body":
            if self.finished:
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if not self.streaming:
                if not more:
                    self.finished = True
                    self.conn.reply(self.call_id, (self.status, self.headers, body))
                    return
                self.streaming = True
                self.conn.chunk(self.call_id, (self.status, self.headers, body))
                return
            if more:
                if body:
                    self.conn.chunk(self.call_id, body)
            else:
                self.finished = True
                self.conn.reply(self.call_id, body)


class HTTPAdapter:
    """Serves proxied HTTP calls for one replica."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.asgi_app: Any = getattr(replica.instance, "_fleet_asgi_app", None)

    async def serve_http(self, conn: ServerConnection, call_id: int, method: str,
                         message: tuple[dict[str, Any], bytes], meta: dict[str, Any]) -> None:
        scope, body = message
        done = asyncio.Event()
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        sender = _Sender(conn, call_id)
        try:
            if self.asgi_app is not None and method == "__call__":
                await self.asgi_app(scope, receive, sender)
            else:
                await self._call_method(scope, receive, sender, method)
        finally:
            done.set()
        if not sender.finished:
            if sender.streaming:
                conn.reply(call_id, b"")
            else:
                conn.reply(call_id, (500, [(b"content-type", b"text/plain")],
                                     b"the application sent no response"))

    async def _call_method(self, scope: dict[str, Any], receive: Any, send: Any,
                           method: str) -> None:
        rep = self.replica
        try:
            fn, kind = rep.method(method)
        except MethodNotFoundError as exc:
            await JSONResponse({"error": str(exc), "deployment": rep.spec.deployment_name,
                                "method": method}, status_code=404)(scope, receive, send)
            return
        request = Request(scope, receive)
        if kind in ("agen", "gen"):
            result = fn(request)
        else:
            result = await rep.invoke(fn, (request,), {}, kind)
        await to_response(result)(scope, receive, send)

    def adapt_args(self, method: str, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   meta: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Handle calls to Request-taking methods (filled in by ServeRequest support)."""
        return args, kwargs

    def on_data(self, conn: ServerConnection, call_id: int, obj: Any) -> None:
        """Messages into a running call (websockets)."""
