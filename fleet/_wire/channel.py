"""Connections: one asyncio.Protocol per socket, calls multiplexed by id.

:class:`Connection` is the shared part (framing, coalesced writes, auth). The caller's
side is :class:`Channel`, which turns calls into :class:`Pending` entries; the serving
side hands frames to a :class:`Handler` (see :mod:`fleet._wire.listener`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from fleet._types import CallMeta, ErrorInfo
from fleet._wire import auth, frames
from fleet._wire.errors import rebuild
from fleet._wire.flow import Credits, Window
from fleet.exceptions import FleetError, ReplicaDiedError

# How long a new connection may take to prove itself (both sides).
AUTH_TIMEOUT_S = 10.0

# The most frames one write carries. Many calls started in one loop iteration (a burst
# of handle calls, a proxy's requests from many clients, the answers to them) go out in
# writes of this many as they are made, not in one at the iteration's end: the peer
# starts on the first ones while the rest are still being made, where one big write
# leaves each side idle while the other works (docs/architecture.md has the figures).
FLUSH_FRAMES = 16


class Connection(asyncio.Protocol):
    """Framing and coalesced writes over one transport. Frames queued before the
    handshake completed wait; only AUTH frames go out before (see fleet._wire.auth)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.authed = False
        self.refused = ""               # why the peer was refused, for error messages
        self._parser = frames.FrameParser(self.on_frame)
        self._wbuf: list[bytes] = []
        self._flush_scheduled = False
        self._loop = asyncio.get_event_loop()
        self.lost = self._loop.create_future()
        self.write_paused = False
        self._drained: asyncio.Future[None] | None = None

    # -- transport callbacks (thin) ------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed(data)
        except Exception as exc:
            self._refuse(f"it sent a malformed frame ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        self.resume_writing()
        self.on_lost()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        d = self._drained
        if d is not None:
            self._drained = None
            if not d.done():
                d.set_result(None)

    async def drain(self) -> None:
        """Until the transport's write buffer is below its high-water mark again
        (streams wait here; single replies never do)."""
        if self.write_paused and not self.closed:
            if self._drained is None:
                self._drained = self._loop.create_future()
            await asyncio.shield(self._drained)

    def send_credit(self, call_id: int, chunks: int, nbytes: int) -> None:
        """Tell the peer that call_id's stream was read this far."""
        self.send(frames.encode_raw(frames.CREDIT, call_id,
                                    frames.CREDIT_PAYLOAD.pack(chunks, nbytes)))

    # -- writing ---------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        """Queue one frame; frames queued in one loop iteration go out in one write,
        FLUSH_FRAMES at most."""
        if self.closed:
            return
        buf = self._wbuf
        buf.append(frame)
        if len(buf) >= FLUSH_FRAMES:
            self._flush()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_now(self, frame: bytes) -> None:
        """Write at once (used for the last frames before closing)."""
        self._flush()
        if self.transport is not None and not self.closed and self.authed:
            self.transport.write(frame)

    def flush(self) -> None:
        """Write the frames queued so far now, not at the end of this loop iteration."""
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self.authed:
            return                  # kept until the handshake completes
        buf = self._wbuf
        if not buf or self.transport is None or self.closed:
            buf.clear()
            return
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self.transport.write(data)

    def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    # -- the handshake -------------------------------------------------------------
    def _write_auth(self, payload: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(frames.encode_raw(frames.AUTH, 0, payload))

    def _authenticated(self) -> None:
        self.authed = True
        self._parser.limit = frames.MAX_FRAME
        self._flush()

    def _refuse(self, why: str) -> None:
        self.refused = why
        if self.transport is not None:
            self.transport.close()

    def _check_peer(self, transport: asyncio.BaseTransport) -> bool:
        why = auth.foreign_peer(transport)
        if why is not None:
            self._refuse(f"the peer was refused: {why}")
            return False
        return True

    # -- to override -------------------------------------------------------------
    def on_frame(self, kind: int, call_id: int, payload: bytes) -> None:
        raise NotImplementedError

    def on_lost(self) -> None:
        pass


def _wake_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Pending:
    """One call awaiting its answer: a future, plus a chunk buffer when streaming.

    A streamed call's chunks are read with :meth:`next` or :meth:`pop`, which return
    credit to the replica (see :mod:`fleet._wire.flow`); :meth:`send` puts messages into
    the running call under the window the replica opens as it reads them."""

    __slots__ = ("future", "chunks", "waiter", "done", "channel", "call_id", "loop",
                 "credits", "out", "notify")

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool,
                 channel: Channel, call_id: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] | None = None if stream else loop.create_future()
        self.chunks: deque[tuple[int, Any, int]] | None = deque() if stream else None
        self.waiter: asyncio.Future[None] | None = None
        self.done = False
        self.channel = channel
        self.call_id = call_id
        self.credits: Credits | None = Credits() if stream else None
        self.out: Window | None = None
        # called (in the reading callback, no task woken) when a streamed item arrives:
        # for a caller that reacts without a coroutine of its own (the HTTP proxy's
        # direct path); it is called again for each item until it unsets itself
        self.notify: Callable[[], None] | None = None

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)
        notify = self.notify
        if notify is not None:
            notify()

    def deliver(self, kind: int, value: Any, size: int = 0) -> None:
        if self.chunks is None:
            fut = self.future
            assert fut is not None
            if fut.done():
                return
            if kind == frames.OK:
                fut.set_result(value)
            else:
                fut.set_exception(value)
            self.done = True
            return
        self.chunks.append((kind, value, size))
        if kind != frames.CHUNK:
            self.done = True
            self._end_out()
        self._wake()

    def _end_out(self) -> None:
        # the call is over: a sender waiting for credit that will never come goes on
        out = self.out
        if out is not None:
            out.grant(out.chunks, out.nbytes)

    def arm(self) -> asyncio.Future[None]:
        """A future set when the next streamed item (or the end) arrives; something
        else (a deadline, a client gone) may set it first. :meth:`disarm` after it."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        self.waiter = waiter
        return waiter

    def disarm(self) -> None:
        self.waiter = None

    async def wait(self, deadline: float | None = None) -> bool:
        """Until a streamed item is there, or the loop's clock reaches deadline;
        whether one is."""
        chunks = self.chunks
        assert chunks is not None
        timer = None
        while not chunks:
            waiter = self.arm()
            if deadline is not None:
                if self.loop.time() >= deadline:
                    self.disarm()
                    return False
                if timer is None:
                    timer = self.loop.call_at(deadline, _wake_future, waiter)
            try:
                await waiter
            finally:
                self.disarm()
                if timer is not None:
                    timer.cancel()
                    timer = None
        return True

    async def next(self) -> tuple[int, Any]:
        """The next streamed item: (CHUNK, item), (OK, final) or raises the error."""
        if not self.chunks:
            await self.wait()
        kind, value = self.pop()
        if kind == frames.ERR:
            raise value
        return kind, value

    def pop(self) -> tuple[int, Any]:
        """Take the oldest streamed item (there must be one), crediting the replica."""
        chunks = self.chunks
        assert chunks is not None
        kind, value, size = chunks.popleft()
        if kind == frames.CHUNK and not self.done:
            credits = self.credits
            assert credits is not None
            credit = credits.read(size)
            if credit is not None:
                self.channel.send_credit(self.call_id, *credit)
        return kind, value

    async def result(self) -> Any:
        assert self.future is not None
        return await self.future

    def cancel(self) -> None:
        """Tell the replica to stop the call; late answers are dropped."""
        if not self.done:
            self.done = True
            self._end_out()
            self.channel.cancel(self.call_id)

    async def send(self, obj: Any) -> None:
        """Send a message into the running call (websocket messages, gRPC request
        streams); waits while the replica is a window behind or the connection's
        buffer is full."""
        if self.push(obj):
            await self.room()

    def push(self, obj: Any) -> bool:
        """Send a message into the running call; True when the sender must now wait
        for :meth:`room` before it sends another."""
        frame = frames.encode(frames.DATA, self.call_id, obj)
        channel = self.channel
        channel.send(frame)
        out = self.out
        if out is None:
            out = self.out = Window()
        return out.sent(len(frame) - frames.HEADER_SIZE) or channel.write_paused

    async def room(self) -> None:
        """Until the replica has read enough for one more message."""
        if self.out is not None:
            await self.out.wait(self.loop)
        if self.channel.write_paused:
            await self.channel.drain()

    def send_data(self, obj: Any) -> None:
        """Send a message into the running call without waiting (a last marker)."""
        self.channel.send(frames.encode(frames.DATA, self.call_id, obj))


class Channel(Connection):
    """The caller's connection to one replica (or the controller)."""

    def __init__(self, secret: bytes, peer: str, on_ctrl: Callable[[Any], None] | None = None,
                 on_closed: Callable[[Channel], None] | None = None) -> None:
        super().__init__()
        self.secret = secret
        self.peer = peer
        self.pending: dict[int, Pending] = {}
        self._next_id = 0
        self._on_ctrl = on_ctrl
        self._on_closed = on_closed
        self._nonce = b""
        self.ready: asyncio.Future[None] = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._check_peer(transport):
            self._nonce, hello = auth.hello()
            self._write_auth(hello)

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             meta: CallMeta | None, stream: bool = False) -> Pending:
        """Start a call; raises TypeError if an argument cannot be pickled."""
        if self.closed:
            raise ReplicaDiedError(f"connection to {self.peer} is closed")
        self._next_id += 1
        call_id = self._next_id
        frame = frames.encode(frames.CALL, call_id, (method, args, kwargs, meta))
        pending = Pending(self._loop, stream, self, call_id)
        self.pending[call_id] = pending
        self.send(frame)
        return pending

    def cancel(self, call_id: int) -> None:
        if self.pending.pop(call_id, None) is not None:
            self.send(frames.encode_raw(frames.CANCEL, call_id, b""))

    def on_frame(self, kind: int, call_id: int, payload: bytes) -> None:
        if not self.authed:
            proof = auth.caller_proof(self.secret, self._nonce, payload) \
                if kind == frames.AUTH else None
            if proof is None:
                self._refuse("it did not prove that it holds this fleet instance's secret")
                return
            self._write_auth(proof)
            self._authenticated()
            if not self.ready.done():
                self.ready.set_result(None)
            return
        if kind == frames.CTRL:
            if self._on_ctrl is not None:
                self._on_ctrl(frames.decode(payload))
            return
        if kind == frames.CHUNK:
            pending = self.pending.get(call_id)
        elif kind == frames.CREDIT:
            pending = self.pending.get(call_id)
            if pending is not None and pending.out is not None:
                pending.out.grant(*frames.CREDIT_PAYLOAD.unpack(payload))
            return
        else:
            pending = self.pending.pop(call_id, None)
        if pending is None:
            return
        try:
            value = frames.decode(payload)
        except Exception as exc:
            # Only this call fails; the connection and its other calls are fine.
            if kind == frames.CHUNK:
                self.pending.pop(call_id, None)
            pending.deliver(frames.ERR, FleetError(
                f"the answer from {self.peer} could not be deserialized here: {exc!r}; "
                "return values whose classes this process can import"))
            return
        if kind == frames.ERR:
            info: ErrorInfo = value
            pending.deliver(kind, rebuild(info))
        else:
            pending.deliver(kind, value, len(payload))

    def on_lost(self) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(
                f"{self.peer} closed the connection before fleet's authentication completed"
                + (f": {self.refused}" if self.refused else "")))
            self.ready.exception()
        pending, self.pending = self.pending, {}
        for p in pending.values():
            p.deliver(frames.ERR, ReplicaDiedError(
                f"{self.peer} died or closed its connection before answering; the call "
                "may or may not have run. A replacement replica is started; retry the call "
                "if it is safe to run twice"))
        if self._on_closed is not None:
            self._on_closed(self)


async def connect(address: str, secret: bytes, peer: str = "", **kwargs: Any) -> Channel:
    """Open a Channel to "unix:/path" or "tcp:host:port"; peer names it in errors."""
    loop = asyncio.get_running_loop()
    peer = peer or address

    def factory() -> Channel:
        return Channel(secret, peer, **kwargs)

    if address.startswith("unix:"):
        _, proto = await loop.create_unix_connection(factory, address[5:])
    elif address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        _, proto = await loop.create_connection(factory, host, int(port))
    else:
        raise ValueError(f"bad data-plane address {address!r}")
    try:
        await asyncio.wait_for(asyncio.shield(proto.ready), AUTH_TIMEOUT_S)
    except asyncio.TimeoutError:
        proto.close()
        raise ConnectionError(f"{peer} did not complete fleet's authentication within "
                              f"{AUTH_TIMEOUT_S:g}s") from None
    return proto
