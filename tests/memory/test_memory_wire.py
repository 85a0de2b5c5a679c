"""The data plane over the in-memory transport pair (fleet._wire.memory): calls,
streams, errors, flush, Pending.wait and a lost peer, with no socket."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fleet._wire import frames
from fleet._wire.channel import FLUSH_FRAMES, Channel
from fleet._wire.listener import ServerConnection
from fleet._wire.memory import connect_pair
from fleet.exceptions import ReplicaDiedError

SECRET = b"s" * 32


class Server:
    """A Handler: ``echo`` replies, ``fail`` raises, ``count`` streams n items."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.closed = asyncio.Event()

    def on_call(self, conn: ServerConnection, call_id: int, method: str,
                args: tuple[Any, ...], kwargs: dict[str, Any],
                meta: dict[str, Any] | None) -> None:
        self.calls.append(method)
        if method == "echo":
            conn.reply(call_id, args[0])
        elif method == "fail":
            conn.reply_error(call_id, ValueError(f"bad {args[0]}"), "in the test server")
        elif method == "count":
            asyncio.get_running_loop().create_task(self._count(conn, call_id, args[0]))

    async def _count(self, conn: ServerConnection, call_id: int, n: int) -> None:
        for i in range(n):
            await conn.stream(call_id, i)
        conn.end_stream(call_id)
        conn.reply(call_id, "done")

    def on_cancel(self, conn: ServerConnection, call_id: int) -> None:
        pass

    def on_data(self, conn: ServerConnection, call_id: int, obj: Any, size: int) -> None:
        pass

    def on_ctrl(self, conn: ServerConnection, msg: Any) -> None:
        conn.ctrl({"type": "pong", "got": msg})

    def on_closed(self, conn: ServerConnection) -> None:
        self.closed.set()


def run(test: Callable[[Channel, ServerConnection, Server], Awaitable[None]],
        secret: bytes = SECRET, **channel_kwargs: Any) -> None:
    async def go() -> None:
        server = Server()
        conn = ServerConnection(server, SECRET)
        channel = Channel(secret, "the test server", **channel_kwargs)
        ours, _ = await connect_pair(channel, conn)
        try:
            await asyncio.wait_for(test(channel, conn, server), 30)
        finally:
            ours.close()

    asyncio.run(go())


def test_a_call_is_answered_through_the_pair() -> None:
    async def test(channel: Channel, conn: ServerConnection, server: Server) -> None:
        assert await channel.call("echo", ({"x": [1, 2]},), {}, None).result() == {"x": [1, 2]}
        assert server.calls == ["echo"]

    run(test)


def test_a_server_error_reaches_the_caller_and_the_connection_goes_on() -> None:
    async def test(channel: Channel, conn: ServerConnection, server: Server) -> None:
        with pytest.raises(ValueError, match="bad 7"):
            await channel.call("fail", (7,), {}, None).result()
        assert await channel.call("echo", (1,), {}, None).result() == 1

    run(test)


def test_a_stream_arrives_in_order_under_its_window() -> None:
    async def test(channel: Channel, conn: ServerConnection, server: Server) -> None:
        pending = channel.call("count", (500,), {}, None, stream=True)
        items = []
        while True:
            kind, value = await pending.next()
            if kind == frames.OK:
                assert value == "done"
                break
            items.append(value)
        assert items == list(range(500))

    run(test)


def test_pending_wait_returns_at_its_deadline_or_with_an_item() -> None:
    async def test(channel: Channel, conn: ServerConnection, server: Server) -> None:
        loop = asyncio.get_running_loop()
        pending = channel.call("silent", (), {}, None, stream=True)
        assert await pending.wait(loop.time() + 0.05) is False      # nothing came
        assert await pending.wait(loop.time() - 1) is False         # already past
        conn.chunk(pending.call_id, "late")
        assert await pending.wait(loop.time() + 30) is True
        assert pending.pop() == (frames.CHUNK, "late")

    run(test)


def test_flush_writes_now_rather_than_at_the_end_of_the_iteration() -> None:
    async def test(channel: Channel, conn: ServerConnection, server: Server) -> None:
        transport = conn.transport
        assert transport is not None
        conn.ctrl({"type": "one"})
        conn.ctrl({"type": "two"})
        assert transport.get_write_buffer_size() == 0       # queued, coalesced
        conn.flush()
        assert transport.get_write_buffer_size() > 0        # both in one write, now
        conn.flush()                                        # nothing left: a no-op

    got: list[Any] = []
    run(test, on_ctrl=got.append)


def test_a_burst_goes_out_in_writes_of_flush_frames_and_in_order() -> None:
    # many frames queued in one iteration leave in writes of FLUSH_FRAMES as they are
    # made, so the peer starts on the first while the rest are still being made
    async def test(channel: Channel, conn: ServerConnection, server: Server) -> None:
        transport = conn.transport
        assert transport is not None
        for i in range(FLUSH_FRAMES - 1):
            conn.ctrl({"type": "burst", "i": i})
        assert transport.get_write_buffer_size() == 0       # still coalescing
        conn.ctrl({"type": "burst", "i": FLUSH_FRAMES - 1})
        written = transport.get_write_buffer_size()
        assert written > 0                                  # the first write, now
        for i in range(FLUSH_FRAMES, FLUSH_FRAMES + 3):
            conn.ctrl({"type": "burst", "i": i})
        assert transport.get_write_buffer_size() == written  # the rest: at the end
        while len(got) < FLUSH_FRAMES + 3:
            await asyncio.sleep(0)
        assert [m["i"] for m in got] == list(range(FLUSH_FRAMES + 3))

    got: list[Any] = []
    run(test, on_ctrl=got.append)


def test_a_lost_peer_fails_the_calls_in_flight() -> None:
    async def test(channel: Channel, conn: ServerConnection, server: Server) -> None:
        pending = channel.call("silent", (), {}, None)
        assert conn.transport is not None
        conn.transport.close()
        with pytest.raises(ReplicaDiedError, match="the test server died or closed"):
            await pending.result()
        await server.closed.wait()
        with pytest.raises(ReplicaDiedError, match="is closed"):
            channel.call("echo", (1,), {}, None)

    run(test)


def test_a_caller_without_the_secret_is_refused() -> None:
    async def go() -> None:
        server = Server()
        conn = ServerConnection(server, SECRET)
        channel = Channel(b"x" * 32, "the test server")
        with pytest.raises(ConnectionError, match="closed the connection before"):
            await connect_pair(channel, conn)
        assert server.calls == [] and not server.closed.is_set()

    asyncio.run(go())


def test_a_writer_is_paused_while_its_peer_does_not_read() -> None:
    async def test(channel: Channel, conn: ServerConnection, server: Server) -> None:
        theirs = conn.transport
        assert theirs is not None
        theirs.pause_reading()
        for _ in range(40):
            channel.call("echo", (b"x" * 4096,), {}, None)
        channel.flush()
        assert channel.write_paused                 # more than the high-water mark waits
        theirs.resume_reading()
        await channel.drain()
        assert not channel.write_paused
        assert await channel.call("echo", (2,), {}, None).result() == 2

    run(test)
