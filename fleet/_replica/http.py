"""HTTP inside the replica: a proxied request becomes an ASGI call to the user's code.

The proxy sends ``(scope, body)`` with the whole request body already read. A plain
deployment gets a Starlette Request in the method the ``X-SERVE-CALL-METHOD`` header
names (``__call__`` by default) and its return value is turned into a response; a
deployment made with :func:`fleet.ingress` hands the call to its ASGI app. A response
goes back as one OK frame ``(status, headers, body)``, or streamed as a CHUNK
``(status, headers, first_body)``, CHUNK ``bytes``..., OK ``last_bytes``. A websocket
call streams the app's ASGI messages back as CHUNKs and receives the client's as DATA.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import typing
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from fleet._ingress import INSTANCE_KEY
from fleet._serve_request import BODY_KEY, ServeRequest
from fleet._types import CallMeta
from fleet._wire.flow import Inbox
from fleet.exceptions import MethodNotFoundError

log = logging.getLogger("fleet.replica")

if TYPE_CHECKING:
    from fleet._replica.replica import Replica
    from fleet._wire.listener import ServerConnection

# Spec 2.4 tells Starlette that sends to a gone client raise, so StreamingResponse does
# not start a task group just to watch for disconnects: the proxy's CANCEL does that.
_ASGI = {"version": "3.0", "spec_version": "2.4"}
_DISCONNECT = {"type": "http.disconnect"}


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
    if inspect.isasyncgen(result):
        return StreamingResponse(_encode_chunks(result))
    if inspect.isgenerator(result):
        # a sync iterator: Starlette steps it in a worker thread, off the event loop
        return StreamingResponse(map(_chunk_bytes, result))
    body = json.dumps(result, default=_jsonable, separators=(",", ":")).encode()
    return Response(body, media_type="application/json")


_TEXT = b"text/plain; charset=utf-8"
_BINARY = b"application/octet-stream"
_JSON = b"application/json"


def whole_reply(result: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """The reply for a str, bytes or JSON-able return value, with the headers
    :func:`to_response`'s Starlette response would have (same names, values and order),
    built without its objects; None for a Response or a generator (to_response's)."""
    if isinstance(result, str):
        body, kind = result.encode(), _TEXT
    elif isinstance(result, bytes | bytearray | memoryview):
        body, kind = bytes(result), _BINARY
    elif isinstance(result, Response) or inspect.isasyncgen(result) \
            or inspect.isgenerator(result):
        return None
    else:
        body = json.dumps(result, default=_jsonable, separators=(",", ":")).encode()
        kind = _JSON
    return 200, [(b"content-length", b"%d" % len(body)), (b"content-type", kind)], body


async def _encode_chunks(gen: Any) -> Any:
    async for item in gen:
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

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
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
                await self.conn.stream(self.call_id, (self.status, self.headers, body))
                return
            if more:
                if body:
                    await self.conn.stream(self.call_id, body)
            else:
                self.finished = True
                self.conn.reply(self.call_id, body)


class _Receive:
    """The ASGI receive of a proxied request: its whole body once, then a disconnect
    when the call is over (an event only for a caller that waits for one)."""

    __slots__ = ("body", "sent", "closed", "gone")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent = False
        self.closed = False
        self.gone: asyncio.Future[None] | None = None

    async def __call__(self) -> dict[str, Any]:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if not self.closed:
            if self.gone is None:
                self.gone = asyncio.get_running_loop().create_future()
            await asyncio.shield(self.gone)
        return _DISCONNECT

    def close(self) -> None:
        self.closed = True
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)


class _WebSocketSender:
    """Every ASGI websocket message of the app goes to the proxy as one CHUNK."""

    __slots__ = ("conn", "call_id")

    def __init__(self, conn: ServerConnection, call_id: int) -> None:
        self.conn = conn
        self.call_id = call_id

    async def __call__(self, message: dict[str, Any]) -> None:
        await self.conn.stream(self.call_id, message)


def _request_param(fn: Any) -> str | None:
    """The name of fn's first parameter when it is annotated as a Starlette Request."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None
    first = params[0]
    ann = first.annotation
    if isinstance(ann, str):
        try:
            ann = typing.get_type_hints(inspect.unwrap(fn)).get(first.name, ann)
        except Exception:
            pass
    if isinstance(ann, str):
        return first.name if ann.rsplit(".", 1)[-1] == "Request" else None
    if inspect.isclass(ann) and issubclass(ann, Request):
        return first.name
    return None


class Lifespan:
    """The ASGI lifespan protocol of an ingress app (FastAPI's ``lifespan=`` and
    ``on_event``): startup when the replica is built, shutdown when it stops. What the
    app's lifespan yields is copied into every request's ``request.state``, as uvicorn
    does. An app that answers the lifespan scope by raising has no lifespan."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._replies: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _send(self, message: dict[str, Any]) -> None:
        self._replies.put_nowait(message)

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}
        try:
            await self.app(scope, self._inbox.get, self._send)
        except BaseException as exc:  # noqa: BLE001 - reported through the replies
            log.debug("the app's lifespan ended with %s: %s", type(exc).__name__, exc)
        finally:
            self._replies.put_nowait(None)

    async def startup(self) -> None:
        """Run the app's startup; raises RuntimeError with the app's message if it failed."""
        self._inbox.put_nowait({"type": "lifespan.startup"})
        self._task = asyncio.get_running_loop().create_task(self._run())
        reply = await self._replies.get()
        if reply is None:                 # raised before answering: no lifespan support
            self._task = None
            return
        if reply["type"] == "lifespan.startup.failed":
            text = (reply.get("message") or "").strip()
            last = text.splitlines()[-1] if text else "(no message)"
            # Starlette's message is the whole traceback: its last line says what failed
            raise RuntimeError(f"the ingress app's lifespan startup failed: {last}"
                               + (f"\n{text}" if text != last else ""))

    async def shutdown(self, timeout: float) -> None:
        """Run the app's shutdown, for up to timeout seconds."""
        task = self._task
        if task is None or task.done():
            return
        self._inbox.put_nowait({"type": "lifespan.shutdown"})
        try:
            reply = await asyncio.wait_for(self._replies.get(), timeout)
        except asyncio.TimeoutError:
            log.warning("the ingress app's lifespan shutdown did not finish in %ss", timeout)
            task.cancel()
            return
        if reply is not None and reply["type"] == "lifespan.shutdown.failed":
            log.error("the ingress app's lifespan shutdown failed: %s", reply.get("message"))


class HTTPAdapter:
    """Serves proxied HTTP and websocket calls for one replica, and turns handle calls
    to Request-taking methods into :class:`fleet.ServeRequest` ones."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.asgi_app: Any = getattr(replica.instance, "_fleet_asgi_app", None)
        self.lifespan = Lifespan(self.asgi_app) if self.asgi_app is not None else None
        # what each method's first parameter wants: a request param's name, or None
        self._takes: dict[str, tuple[str | None, frozenset[str]]] = {}
        self._inboxes: dict[tuple[int, int], Inbox] = {}

    async def serve_http(self, conn: ServerConnection, call_id: int, method: str,
                         message: tuple[dict[str, Any], bytes], meta: CallMeta) -> None:
        scope, body = message
        scope["asgi"] = _ASGI
        if self.asgi_app is not None:
            scope[INSTANCE_KEY] = self.replica.instance
            state = self.lifespan.state if self.lifespan is not None else None
            if state:
                scope["state"] = dict(state)
        if scope["type"] == "websocket":
            await self._serve_websocket(conn, call_id, scope)
            return
        if body:
            scope[BODY_KEY] = body
        receive = _Receive(body)
        sender = _Sender(conn, call_id)
        try:
            if self.asgi_app is not None:
                # The app sees every request: its middleware, auth and validation are
                # never bypassed, and the call-method header is an ordinary header to it.
                await self.asgi_app(scope, receive, sender)
            else:
                await self._call_method(scope, receive, sender, method, body)
        except Exception:
            if not sender.finished:
                raise           # the caller gets it: the proxy answers 500 and logs it
            # the app answered (Starlette's error middleware sends its own 500) and then
            # raised: the caller has its answer, so the exception is logged here
            log.exception("%s %s raised after answering in %s", scope.get("method", ""),
                          scope.get("path", ""), self.replica.where)
        finally:
            receive.close()
        if not sender.finished:
            if sender.streaming:
                conn.reply(call_id, b"")
            else:
                conn.reply(call_id, (500, [(b"content-type", b"text/plain")],
                                     b"the application sent no response"))

    async def _call_method(self, scope: dict[str, Any], receive: Any, send: _Sender,
                           method: str, body: bytes) -> None:
        rep = self.replica
        try:
            fn, kind = rep.http_method(method)
        except MethodNotFoundError as exc:
            shown = method if len(method) <= 64 else method[:64] + "..."
            await JSONResponse({"error": str(exc), "deployment": rep.spec.deployment_name,
                                "method": shown}, status_code=404)(scope, receive, send)
            return
        request = Request(scope, receive)
        request._body = body  # the proxy read it all: sync methods can use it too
        try:
            if kind in ("agen", "gen"):
                result = fn(request)
            else:
                result = await rep.invoke(fn, (request,), {}, kind)
        except HTTPException as exc:
            # an answer the method chose: it reaches the client as it is
            result = JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                                  headers=exc.headers)
        reply = whole_reply(result)
        if reply is not None:           # the common case, without Starlette's objects
            send.finished = True
            send.conn.reply(send.call_id, reply)
            return
        await to_response(result)(scope, receive, send)

    async def startup(self) -> None:
        """The ingress app's lifespan startup (nothing for plain deployments)."""
        if self.lifespan is not None:
            await self.lifespan.startup()

    async def shutdown(self, timeout: float) -> None:
        """The ingress app's lifespan shutdown, once the replica has drained."""
        if self.lifespan is not None:
            await self.lifespan.shutdown(timeout)

    # -- websockets ------------------------------------------------------------------
    async def _serve_websocket(self, conn: ServerConnection, call_id: int,
                               scope: dict[str, Any]) -> None:
        sender = _WebSocketSender(conn, call_id)
        if self.asgi_app is None:
            # only an ASGI app (fleet.ingress) has websocket routes; refuse the handshake
            await sender({"type": "websocket.close", "code": 1000, "reason": ""})
            conn.reply(call_id, None)
            return
        key = (id(conn), call_id)
        inbox = conn.inbox(call_id)
        inbox.put_nowait({"type": "websocket.connect"})
        self._inboxes[key] = inbox
        try:
            await self.asgi_app(scope, inbox.get, sender)
        finally:
            del self._inboxes[key]
        conn.reply(call_id, None)

    def on_data(self, conn: ServerConnection, call_id: int, obj: Any, size: int) -> None:
        """A client message for a running websocket call (late ones are dropped)."""
        inbox = self._inboxes.get((id(conn), call_id))
        if inbox is not None:
            inbox.put(obj, size)

    # -- handle calls ----------------------------------------------------------------
    def takes_request(self, method: str, fn: Any) -> bool:
        """Whether handle calls to method need a ServeRequest (cached per method)."""
        found = self._takes.get(method)
        if found is None:
            name = _request_param(fn)
            others: frozenset[str] = frozenset()
            if name is not None:
                others = frozenset(p for p in inspect.signature(fn).parameters if p != name)
            found = self._takes[method] = (name, others)
        return found[0] is not None

    def adapt_args(self, method: str, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   meta: CallMeta | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A handle call to a Request-taking method: the first argument, the
        ``http_headers`` option and the keyword arguments become one ServeRequest.

        Keyword arguments named like another parameter of the method stay arguments; a
        Request or ServeRequest passed on by another deployment arrives as it is."""
        if not self.takes_request(method, fn):
            return args, kwargs
        if args and isinstance(args[0], Request | ServeRequest):
            return args, kwargs
        others = self._takes[method][1]
        query = {k: v for k, v in kwargs.items() if k not in others}
        if query:
            kwargs = {k: v for k, v in kwargs.items() if k in others}
        headers = meta.get("http_headers") if meta else None
        request = ServeRequest(args[0] if args else None, headers=headers, query_params=query)
        return (request, *args[1:]), kwargs
