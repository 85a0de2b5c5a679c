"""gRPC inside the replica: request bytes from the proxy become the user's messages.

The proxy forwards raw bytes; this side knows the schema (from the generated
``XServicer`` the user's class subclasses, or from a servicer function named in
``grpc_options``), parses the request, runs the method with a servicer context that
records status, details and metadata, and answers with the serialized reply.

Call meta from the proxy: ``{"grpc": "/pkg.Service/Method", "md": ((key, value), ...),
"fn": servicer function path or None, "in": "args" | "data", "out": bool,
"timeout": seconds left or None}``. With ``"in": "data"`` request messages arrive as
DATA frames (bytes), ``None`` marking the end of the client's stream. The reply is OK
``bytes`` when the status is OK with no metadata, else OK ``(message or None, code,
details, trailing metadata, initial metadata)``; streamed replies are CHUNK ``bytes``
before that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import namedtuple
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from fleet._grpc_schema import (
    GrpcStatus,
    MethodSchema,
    class_servicers,
    load_servicer_function,
    servicer_handlers,
)
from fleet._types import CallMeta, GrpcReply
from fleet._wire.flow import Inbox
from fleet.exceptions import MethodNotFoundError

if TYPE_CHECKING:
    from fleet._replica.replica import Replica
    from fleet._wire.listener import ServerConnection

log = logging.getLogger("fleet.replica")

OK = grpc.StatusCode.OK

#: One metadata entry, as ``context.invocation_metadata()`` gives them.
Metadatum = namedtuple("Metadatum", ("key", "value"))


class _Done:
    """An awaitable that is already finished, for context calls grpc.aio awaits and
    sync grpcio code does not."""

    __slots__ = ()

    def __await__(self) -> Iterator[None]:
        return iter(())


_DONE = _Done()


class ServicerContext:
    """What a servicer method gets as ``context``: grpcio's calls that matter for a
    handler, recorded here and sent back to the client with the reply."""

    def __init__(self, meta: CallMeta,
                 write: Callable[[Any], Awaitable[None]] | None = None,
                 read: Callable[[], Any] | None = None) -> None:
        self._md = tuple(Metadatum(k, v) for k, v in meta.get("md", ()))
        timeout = meta.get("timeout")
        self._deadline = time.monotonic() + timeout if timeout is not None else None
        self._code: grpc.StatusCode = OK
        self._details = ""
        self._trailing: tuple[tuple[str, Any], ...] = ()
        self._initial: tuple[tuple[str, Any], ...] = ()
        self._write = write
        self._read = read
        self._callbacks: list[Callable[[], None]] = []

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        """The metadata the client sent."""
        return self._md

    def set_code(self, code: grpc.StatusCode) -> None:
        """The status the client gets when the method returns."""
        self._code = code

    def set_details(self, details: str) -> None:
        """The status message the client gets."""
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, metadata: Any) -> None:
        """Metadata sent with the status at the end of the call."""
        self._trailing = tuple((k, v) for k, v in metadata)

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing

    def send_initial_metadata(self, metadata: Any) -> Any:
        """Metadata sent before the first reply message; ``await`` it (grpc.aio) or not
        (grpcio's sync servicers)."""
        self._initial = tuple((k, v) for k, v in metadata)
        return _DONE

    def abort(self, code: grpc.StatusCode, details: str = "",
              trailing_metadata: Any = None) -> Any:
        """End the call with code and details; raises at once, so ``await
        context.abort(...)`` (grpc.aio) and ``context.abort(...)`` both work."""
        if code == OK:
            raise ValueError("abort needs a status code other than OK")
        if trailing_metadata is not None:
            self.set_trailing_metadata(trailing_metadata)
        raise GrpcStatus(code, details)

    def abort_with_status(self, status: Any) -> Any:
        self.abort(status.code, status.details, getattr(status, "trailing_metadata", None))

    def time_remaining(self) -> float | None:
        """Seconds left before the client's deadline (None without one)."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def peer(self) -> str:
        return "fleet-proxy"

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._callbacks.append(callback)
        return True

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(lambda: callback(self))

    async def write(self, message: Any) -> None:
        """Send one reply message of a response stream (grpc.aio style)."""
        if self._write is None:
            raise RuntimeError("context.write() is only for methods that stream replies")
        await self._write(message)

    async def read(self) -> Any:
        """The next request message of a request stream, or ``grpc.aio.EOF``."""
        if self._read is None:
            raise RuntimeError("context.read() is only for methods that take a stream")
        return await self._read()

    def _status(self, message: bytes | None) -> Any:
        if self._code == OK and not self._trailing and not self._initial \
                and message is not None:
            return message
        return GrpcReply(message, self._code.value[0], self._details, self._trailing,
                         self._initial)

    def _run_callbacks(self) -> None:
        for cb in self._callbacks:
            try:
                cb()
            except Exception:
                log.exception("a gRPC context callback raised")


class GRPCAdapter:
    """Serves proxied gRPC calls for one replica."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.loop = replica.loop
        self.methods: dict[str, MethodSchema] = {}
        self.modules: list[str] = []
        self.inboxes: dict[tuple[int, int], Inbox] = {}
        self._loaded_fns: set[str] = set()
        if not replica.is_function:
            try:
                for module, fn in class_servicers(type(replica.instance)):
                    self._add(fn)
                    self.modules.append(module)
            except Exception:  # its calls answer UNIMPLEMENTED, with the reason logged
                log.exception("could not read the gRPC schema of %s", replica.where)

    def _add(self, fn: Callable[[Any, Any], None]) -> None:
        for full, handler in servicer_handlers(fn).items():
            self.methods.setdefault(full, MethodSchema(handler))

    def _schema(self, full: str, fn_path: str | None) -> MethodSchema | None:
        schema = self.methods.get(full)
        if schema is None and fn_path and fn_path not in self._loaded_fns:
            self._loaded_fns.add(fn_path)
            self._add(load_servicer_function(fn_path))
            schema = self.methods.get(full)
        return schema

    def describe(self) -> dict[str, Any]:
        """The RPCs this replica's class serves, for the proxy's fast paths and reflection."""
        return {"methods": {m: (s.request_streaming, s.response_streaming)
                            for m, s in self.methods.items()},
                "modules": list(self.modules)}

    # -- called by the replica -----------------------------------------------------
    def accept(self, conn: ServerConnection, call_id: int, meta: CallMeta) -> None:
        """A call arrived: open its inbox now, before its DATA frames are handled."""
        if meta.get("in") == "data":
            self.inboxes[(id(conn), call_id)] = conn.inbox(call_id)

    def on_data(self, conn: ServerConnection, call_id: int, obj: Any, size: int) -> bool:
        inbox = self.inboxes.get((id(conn), call_id))
        if inbox is None:
            return False
        inbox.put(obj, size)
        return True

    async def serve(self, conn: ServerConnection, call_id: int, rpc: str,
                    args: tuple[Any, ...], meta: CallMeta) -> None:
        key = (id(conn), call_id)
        try:
            if meta.get("describe"):
                conn.reply(call_id, self.describe())
                return
            await self._serve(conn, call_id, rpc, args, meta, key)
        finally:
            self.inboxes.pop(key, None)

    async def _serve(self, conn: ServerConnection, call_id: int, rpc: str,
                     args: tuple[Any, ...], meta: CallMeta, key: tuple[int, int]
                     ) -> None:
        full: str = meta["grpc"]
        rep = self.replica
        where = f"deployment {rep.spec.deployment_name!r} of application {rep.spec.app_name!r}"
        try:
            schema = self._schema(full, meta.get("fn"))
        except Exception as exc:
            return self._fail(conn, call_id, grpc.StatusCode.INTERNAL,
                              f"{where} could not load the schema of {full}: {exc}")
        if schema is None:
            return self._fail(conn, call_id, grpc.StatusCode.UNIMPLEMENTED,
                              f"{where} does not serve the RPC {full}: its class subclasses "
                              "no generated servicer with it, and no grpc_servicer_functions "
                              "entry names it")
        try:
            fn, kind = rep.method(rpc)
        except MethodNotFoundError:
            return self._fail(conn, call_id, grpc.StatusCode.UNIMPLEMENTED,
                              f"{where} has no method {rpc!r} for the RPC {full}")
        inbox = self.inboxes.get(key)
        ser = schema.serialize
        stream_out = schema.response_streaming
        if stream_out and not meta.get("out"):
            return self._fail(conn, call_id, grpc.StatusCode.INTERNAL,
                              f"{full} streams replies in {where}'s schema but the proxy's "
                              "schema says it does not; use the same generated code")

        async def write(message: Any) -> None:
            await conn.stream(call_id, ser(message))

        ctx = ServicerContext(meta, write if stream_out else None,
                              self._reader(inbox, schema) if inbox is not None else None)
        try:
            if schema.request_streaming:
                if inbox is None:
                    raise GrpcStatus(grpc.StatusCode.INTERNAL, "a request stream arrived as one "
                                                          "message; the proxy's schema differs")
                request: Any = self._requests(inbox, schema, kind)
            else:
                data = args[0] if inbox is None else await inbox.get()
                try:
                    request = schema.deserialize(data)
                except Exception as exc:
                    raise GrpcStatus(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid message for {full}: {exc}"
                                ) from None
            if stream_out:
                await self._stream(fn, kind, request, ctx, write)
                conn.reply(call_id, ctx._status(None))
            else:
                result = await rep.invoke(fn, (request, ctx), {}, kind)
                if result is None and ctx._code == OK:
                    raise GrpcStatus(grpc.StatusCode.INTERNAL, f"{rpc} of {where} returned None "
                                                          "instead of a reply message")
                conn.reply(call_id, ctx._status(None if result is None else ser(result)))
        except GrpcStatus as exc:
            ctx._code, ctx._details = exc.code, exc.details
            conn.reply(call_id, ctx._status(None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if ctx._code != OK:
                # As in grpcio, a code the method set before raising is kept, with its
                # details (the generated servicer base sets UNIMPLEMENTED, then raises).
                log.info("%s of %s raised after setting %s", full, where, ctx._code,
                         exc_info=True)
                conn.reply(call_id, ctx._status(None))
            else:
                # not a status the servicer chose: the proxy answers INTERNAL with the
                # call's id and logs the exception, whose text never reaches the client
                conn.reply_error(call_id, exc, f"in {full} of {where}")
        finally:
            ctx._run_callbacks()

    def _fail(self, conn: ServerConnection, call_id: int, code: grpc.StatusCode,
              details: str) -> None:
        conn.reply(call_id, GrpcReply(None, code.value[0], details, (), ()))

    # -- request streams -------------------------------------------------------------
    def _reader(self, inbox: Inbox, schema: MethodSchema) -> Callable[[], Any]:
        async def read() -> Any:
            data = await inbox.get()
            if data is None:
                inbox.put_nowait(None)      # later reads see the end too
                return grpc.aio.EOF
            return _parse(schema, data)
        return read

    def _requests(self, inbox: Inbox, schema: MethodSchema, kind: str) -> Any:
        if kind == "sync" or kind == "gen":
            return _SyncRequests(inbox, schema, self.loop)
        return _async_requests(inbox, schema)

    async def _stream(self, fn: Any, kind: str, request: Any, ctx: ServicerContext,
                      write: Callable[[Any], Awaitable[None]]) -> None:
        rep = self.replica
        if kind == "agen":
            agen = fn(request, ctx)
            try:
                async for item in agen:
                    await write(item)
            finally:
                await agen.aclose()
            return
        if kind == "gen":
            gen = fn(request, ctx)
            end = object()
            try:
                while True:
                    item = await self.loop.run_in_executor(rep.pool, next, gen, end)
                    if item is end:
                        return
                    await write(item)
            finally:
                gen.close()
        result = await rep.invoke(fn, (request, ctx), {}, kind)
        if result is None:          # wrote its replies with context.write()
            return
        if hasattr(result, "__aiter__"):
            async for item in result:
                await write(item)
        else:
            for item in result:
                await write(item)


def _parse(schema: MethodSchema, data: bytes) -> Any:
    try:
        return schema.deserialize(data)
    except Exception as exc:
        raise GrpcStatus(grpc.StatusCode.INVALID_ARGUMENT,
                    f"a request message could not be parsed: {exc}") from None


async def _async_requests(inbox: Inbox, schema: MethodSchema
                          ) -> AsyncIterator[Any]:
    while True:
        data = await inbox.get()
        if data is None:
            return
        yield _parse(schema, data)


class _SyncRequests(Iterator[Any]):
    """A request stream for a sync method running in the thread pool."""

    def __init__(self, inbox: Inbox, schema: MethodSchema,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._inbox = inbox
        self._schema = schema
        self._loop = loop
        self._ended = False

    def __next__(self) -> Any:
        if self._ended:
            raise StopIteration
        data = asyncio.run_coroutine_threadsafe(self._inbox.get(), self._loop).result()
        if data is None:
            self._ended = True
            raise StopIteration
        return _parse(self._schema, data)


def adapter(replica: Replica) -> GRPCAdapter:
    """The replica's adapter, made on its first gRPC call."""
    found: GRPCAdapter | None = getattr(replica, "grpc", None)
    if found is None:
        found = GRPCAdapter(replica)
        replica.grpc = found
    return found
