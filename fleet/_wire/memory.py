"""An in-process transport pair: the in-memory twin of a socket for the data plane.

:func:`connect_pair` joins a caller's :class:`~fleet._wire.channel.Channel` and a
serving :class:`~fleet._wire.listener.ServerConnection` with no socket between them:
bytes written on one side arrive at the other on a later loop iteration, as from a
socket, and a writer is paused (``pause_writing``) while more than ``high_water`` bytes
wait for the peer to take them, as a socket's buffer would. Authentication, framing,
flow control and errors run exactly as over a socket.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fleet._wire.channel import AUTH_TIMEOUT_S, Channel, Connection

HIGH_WATER = 64 * 1024


class MemoryTransport(asyncio.Transport):
    """One end of an in-process pipe; writes go to the peer protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: Connection,
                 high_water: int = HIGH_WATER) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self.peer: MemoryTransport | None = None
        self._buffer: list[bytes] = []     # written, not yet handed to the peer
        self._buffered = 0
        self._high_water = high_water
        self._scheduled = False
        self._closing = False
        self._writer_paused = False
        self._reading = True

    # -- asyncio.Transport --------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": "memory", "sockname": "memory"}.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self._buffer.append(bytes(data))
        self._buffered += len(data)
        if self._buffered > self._high_water and not self._writer_paused:
            self._writer_paused = True
            self._protocol.pause_writing()
        self._schedule()

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        self._reading = True
        if self.peer is not None:
            self.peer._schedule()

    def is_reading(self) -> bool:
        return self._reading

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        # what was written still reaches the peer, then both ends are closed
        self._loop.call_soon(self._deliver)
        self._loop.call_soon(self._lost)

    def abort(self) -> None:
        self._buffer.clear()
        self._buffered = 0
        self.close()

    # -- the pipe -----------------------------------------------------------------
    def _schedule(self) -> None:
        if not self._scheduled and self._buffer:
            self._scheduled = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        peer = self.peer
        if peer is None or not self._buffer:
            return
        if not peer._reading or peer._protocol.closed:
            return                                  # resume_reading delivers
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        if self._writer_paused:
            self._writer_paused = False
            self._protocol.resume_writing()
        peer._protocol.data_received(data)

    def _lost(self) -> None:
        for end in (self, self.peer):
            if end is not None and not end._protocol.closed:
                end._closing = True
                end._protocol.connection_lost(None)


async def connect_pair(channel: Channel, server: Connection,
                       high_water: int = HIGH_WATER
                       ) -> tuple[MemoryTransport, MemoryTransport]:
    """Join channel (the caller) and server (e.g. a ServerConnection) in memory and
    wait until they authenticated each other; returns (channel's end, server's end)."""
    loop = asyncio.get_running_loop()
    ours = MemoryTransport(loop, channel, high_water)
    theirs = MemoryTransport(loop, server, high_water)
    ours.peer, theirs.peer = theirs, ours
    server.connection_made(theirs)
    channel.connection_made(ours)
    try:
        await asyncio.wait_for(asyncio.shield(channel.ready), AUTH_TIMEOUT_S)
    except asyncio.TimeoutError:
        ours.close()
        raise ConnectionError(f"{channel.peer} did not complete fleet's authentication "
                              f"within {AUTH_TIMEOUT_S:g}s") from None
    return ours, theirs


__all__ = ["MemoryTransport", "connect_pair"]
