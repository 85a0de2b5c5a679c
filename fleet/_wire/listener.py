"""The serving side: accept connections, check the secret, hand calls to a Handler."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import MutableSet
from typing import Any, Protocol

from fleet._types import CallMeta, ControlMessage
from fleet._wire import auth, frames
from fleet._wire.channel import AUTH_TIMEOUT_S, Connection
from fleet._wire.errors import error_info
from fleet._wire.flow import Inbox, Window

# A stream that never has to wait still yields to the loop after this many items.
YIELD_EVERY = 16


class Handler(Protocol):
    """What a server (replica, controller) does with a connection's frames."""

    def on_call(self, conn: ServerConnection, call_id: int, method: str,
                args: tuple[Any, ...], kwargs: dict[str, Any], meta: CallMeta | None
                ) -> None: ...

    def on_cancel(self, conn: ServerConnection, call_id: int) -> None: ...

    def on_data(self, conn: ServerConnection, call_id: int, obj: Any, size: int) -> None: ...

    def on_ctrl(self, conn: ServerConnection, msg: ControlMessage) -> None: ...

    def on_closed(self, conn: ServerConnection) -> None: ...


class ServerConnection(Connection):
    """One accepted connection; nothing is unpickled until the caller proved it holds
    the secret, and a caller that has not within AUTH_TIMEOUT_S is disconnected."""

    def __init__(self, handler: Handler, secret: bytes) -> None:
        super().__init__()
        self.handler = handler
        self.secret = secret
        self.tag: Any = None          # what the handler knows this peer as
        # the version of the controller's tables this peer said it applied, if it acks
        self.acked: int | None = None
        self._nonces: tuple[bytes, bytes] | None = None
        self.windows: dict[int, Window] = {}    # streamed calls' reply windows

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._check_peer(transport):
            self._loop.call_later(AUTH_TIMEOUT_S, self._auth_deadline)

    def _auth_deadline(self) -> None:
        if not self.authed and not self.closed:
            self._refuse("it did not authenticate in time")

    def on_frame(self, kind: int, call_id: int, payload: bytes) -> None:
        if not self.authed:
            if kind != frames.AUTH:
                self._refuse(f"it sent a {frames.KIND_NAMES.get(kind, kind)} frame before "
                             "authenticating")
            elif self._nonces is None:
                got = auth.server_reply(self.secret, payload)
                if got is None:
                    self._refuse("its AUTH frame was malformed")
                    return
                caller_nonce, server_nonce, reply = got
                self._nonces = (caller_nonce, server_nonce)
                self._write_auth(reply)
            elif auth.check_caller(self.secret, *self._nonces, payload):
                self._authenticated()
            else:
                self._refuse("its proof of the secret did not match")
            return
        if kind == frames.CALL:
            try:
                method, args, kwargs, meta = frames.decode(payload)
            except Exception as exc:
                self.reply_error(call_id, TypeError(
                    f"could not deserialize the call's arguments: {exc!r}"))
                return
            self.handler.on_call(self, call_id, method, args, kwargs, meta)
        elif kind == frames.CANCEL:
            self.handler.on_cancel(self, call_id)
        elif kind == frames.DATA:
            self.handler.on_data(self, call_id, frames.decode(payload), len(payload))
        elif kind == frames.CREDIT:
            window = self.windows.get(call_id)
            if window is not None:
                window.grant(*frames.CREDIT_PAYLOAD.unpack(payload))
        elif kind == frames.CTRL:
            self.handler.on_ctrl(self, frames.decode(payload))

    def on_lost(self) -> None:
        if self.authed:
            self.handler.on_closed(self)

    def reply(self, call_id: int, value: Any) -> None:
        """Send a call's final value (or an error if it cannot be pickled)."""
        try:
            frame = frames.encode(frames.OK, call_id, value)
        except (TypeError, ValueError) as exc:      # unpicklable, or over a frame
            self.reply_error(call_id, type(exc)(f"the result could not be sent back: {exc}"))
            return
        self.send(frame)

    def chunk(self, call_id: int, value: Any) -> None:
        """Send one streamed item without waiting (see :meth:`stream`); raises (for the
        call alone to fail) when it cannot be pickled or does not fit in a frame."""
        self.send(frames.encode(frames.CHUNK, call_id, value))

    async def stream(self, call_id: int, value: Any) -> None:
        """Send one streamed item, then wait while the caller is a window behind or
        the connection's buffer is full. Otherwise it still yields to the loop every
        YIELD_EVERY items: a generator that never awaits lets other calls, health
        checks and cancels run, while the items of one loop iteration still leave in
        one write. The caller ends the call with :meth:`end_stream`."""
        frame = frames.encode(frames.CHUNK, call_id, value)
        self.send(frame)
        window = self.windows.get(call_id)
        if window is None:
            window = self.windows[call_id] = Window()
        if window.sent(len(frame) - frames.HEADER_SIZE):
            await window.wait(self._loop)
        if self.write_paused:
            await self.drain()
        elif window.sent_total % YIELD_EVERY == 0:
            await asyncio.sleep(0)

    def end_stream(self, call_id: int) -> None:
        """Forget a finished call's reply window."""
        self.windows.pop(call_id, None)

    def inbox(self, call_id: int) -> Inbox:
        """A queue for the messages the caller sends into call_id, crediting it as
        they are read."""
        return Inbox(self._loop, lambda chunks, nbytes: self.send_credit(call_id, chunks,
                                                                          nbytes))

    def reply_error(self, call_id: int, exc: BaseException, where: str = "",
                    **flags: Any) -> None:
        self.send(frames.encode(frames.ERR, call_id, error_info(exc, where, **flags)))

    def ctrl(self, msg: ControlMessage) -> None:
        self.send(frames.encode(frames.CTRL, 0, msg))


async def listen(handler: Handler, secret: bytes, address: str,
                 accepted: MutableSet[ServerConnection] | None = None
                 ) -> asyncio.AbstractServer:
    """Serve on "unix:/path" or "tcp:host:port" (port 0 picks one; see server.sockets).

    Every accepted connection is added to ``accepted`` when given (a server sharing its
    process closes them itself when it ends, as a process's exit would)."""
    loop = asyncio.get_running_loop()

    def factory() -> ServerConnection:
        conn = ServerConnection(handler, secret)
        if accepted is not None:
            accepted.add(conn)
        return conn

    if address.startswith("unix:"):
        path = address[5:]
        if os.path.exists(path):
            os.unlink(path)
        server = await loop.create_unix_server(factory, path)
        os.chmod(path, 0o600)
        return server
    host, _, port = address[4:].rpartition(":")
    return await loop.create_server(factory, host, int(port))


def bound_port(server: asyncio.AbstractServer) -> int:
    """The TCP port a server from listen("tcp:host:0") got."""
    sockets: list[socket.socket] = list(getattr(server, "sockets", None) or [])
    return int(sockets[0].getsockname()[1])
