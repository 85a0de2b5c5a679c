"""The serving side: accept connections, check the secret, hand calls to a Handler."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Protocol

from fleet._wire import auth, frames
from fleet._wire.channel import AUTH_TIMEOUT_S, Connection
from fleet._wire.errors import error_info


class Handler(Protocol):
    """What a server (replica, controller) does with a connection's frames."""

    def on_call(self, conn: ServerConnection, call_id: int, method: str,
                args: tuple[Any, ...], kwargs: dict[str, Any], meta: dict[str, Any] | None
                ) -> None: ...

    def on_cancel(self, conn: ServerConnection, call_id: int) -> None: ...

    def on_data(self, conn: ServerConnection, call_id: int, obj: Any) -> None: ...

    def on_ctrl(self, conn: ServerConnection, msg: Any) -> None: ...

    def on_closed(self, conn: ServerConnection) -> None: ...


class ServerConnection(Connection):
    """One accepted connection; nothing is unpickled until the caller proved it holds
    the secret, and a caller that has not within AUTH_TIMEOUT_S is disconnected."""

    def __init__(self, handler: Handler, secret: bytes) -> None:
        super().__init__()
        self.handler = handler
        self.secret = secret
        self.tag: Any = None          # what the handler knows this peer as
        self._nonces: tuple[bytes, bytes] | None = None

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
            self.handler.on_data(self, call_id, frames.decode(payload))
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
        """Send one streamed item; raises (for the call alone to fail) when it cannot be
        pickled or does not fit in a frame."""
        self.send(frames.encode(frames.CHUNK, call_id, value))

    def reply_error(self, call_id: int, exc: BaseException, where: str = "",
                    **flags: Any) -> None:
        self.send(frames.encode(frames.ERR, call_id, error_info(exc, where, **flags)))

    def ctrl(self, msg: Any) -> None:
        self.send(frames.encode(frames.CTRL, 0, msg))


async def listen(handler: Handler, secret: bytes, address: str) -> asyncio.AbstractServer:
    """Serve on "unix:/path" or "tcp:host:port" (port 0 picks one; see server.sockets)."""
    loop = asyncio.get_running_loop()

    def factory() -> ServerConnection:
        return ServerConnection(handler, secret)

    if address.startswith("unix:"):
        path = address[5:]
        if os.path.exists(path):
            os.unlink(path)
        server = await loop.create_unix_server(factory, path)
        os.chmod(path, 0o600)
        return server
    host, _, port = address[4:].rpartition(":")
    return await loop.create_server(factory, host, int(port))
