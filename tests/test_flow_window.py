"""The flow-control window and credits of fleet._wire.flow, in memory: the rules the
stream tests (tests/test_flow_control.py) rely on."""

from __future__ import annotations

import asyncio
import random

import pytest

from fleet._wire.flow import WINDOW_BYTES, WINDOW_CHUNKS, Credits, Inbox, Window


def test_window_fills_at_its_chunk_count_or_its_bytes_whichever_first():
    w = Window()
    assert not any(w.sent(10) for _ in range(WINDOW_CHUNKS - 1))
    assert w.sent(10)
    w = Window()
    assert w.sent(WINDOW_BYTES)         # one chunk as large as the window fills it
    w.grant(1, WINDOW_BYTES)
    assert not w.full


def test_credits_are_sent_every_half_window():
    c = Credits()
    got = [c.read(1) for _ in range(WINDOW_CHUNKS)]
    sent = [g for g in got if g is not None]
    assert sent == [(WINDOW_CHUNKS // 2, WINDOW_CHUNKS // 2)] * 2
    assert c.read(WINDOW_BYTES // 2) == (1, WINDOW_BYTES // 2)


@pytest.mark.parametrize("seed", range(20))
def test_producer_and_slow_consumer_never_deadlock_and_stay_a_window_apart(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([1, 100, 4096, 300_000, 2 * WINDOW_BYTES]) for _ in range(400)]

    async def run() -> int:
        loop = asyncio.get_running_loop()
        window = Window()
        credits = Credits()
        queue: asyncio.Queue[int] = asyncio.Queue()
        most = 0

        async def produce() -> None:
            nonlocal most
            for size in sizes:
                queue.put_nowait(size)
                most = max(most, queue.qsize())
                if window.sent(size):
                    await window.wait(loop)

        async def consume() -> int:
            for _ in sizes:
                size = await queue.get()
                if rng.random() < 0.3:
                    await asyncio.sleep(0)      # a slow reader now and then
                credit = credits.read(size)
                if credit is not None:
                    window.grant(*credit)
            return most

        producer = loop.create_task(produce())
        result = await asyncio.wait_for(consume(), 10)
        await producer
        return result

    assert asyncio.run(run()) <= WINDOW_CHUNKS


def test_inbox_credits_the_sender_as_the_call_reads():
    async def run() -> list[tuple[int, int]]:
        credits: list[tuple[int, int]] = []
        inbox = Inbox(asyncio.get_running_loop(), lambda c, b: credits.append((c, b)))
        for _ in range(WINDOW_CHUNKS):
            inbox.put(b"m", 10)
        inbox.put_nowait(None)              # a marker counts for nothing
        assert inbox.qsize() == WINDOW_CHUNKS + 1
        for _ in range(WINDOW_CHUNKS):
            assert await inbox.get() == b"m"
        assert await inbox.get() is None
        return credits

    assert asyncio.run(run()) == [(WINDOW_CHUNKS // 2, WINDOW_CHUNKS * 5)] * 2


def test_stream_waits_while_its_connection_cannot_write_and_resumes_when_it_drains():
    # a real socket pair whose far end reads nothing until told: the producer must stop
    # on the transport's pause_writing long before its window (16 chunks of 64 KiB)
    import socket

    from fleet._wire.listener import ServerConnection

    async def run() -> tuple[int, int, bool]:
        loop = asyncio.get_running_loop()
        near, far = socket.socketpair()
        near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        far.setblocking(False)
        _, conn = await loop.connect_accepted_socket(
            lambda: ServerConnection(None, b""), near)  # type: ignore[arg-type]
        assert isinstance(conn, ServerConnection)
        conn._authenticated()       # as after the handshake: only then does it write
        sent = 0

        async def produce() -> None:
            nonlocal sent
            while True:
                await conn.stream(1, b"x" * 65536)
                sent += 1

        task = loop.create_task(produce())
        for _ in range(500):                # loop iterations, not time
            await asyncio.sleep(0)
        paused, blocked_at = conn.write_paused, sent
        window_credit = (blocked_at, blocked_at * 65536)
        conn.windows[1].grant(*window_credit)   # no window holds it back now
        while sent == blocked_at:           # read the far end until the producer moves
            try:
                far.recv(1 << 20)
            except BlockingIOError:
                pass
            await asyncio.sleep(0)
        task.cancel()
        conn.close()
        far.close()
        return blocked_at, sent, paused

    blocked_at, sent, paused = asyncio.run(run())
    assert paused and blocked_at < WINDOW_BYTES // 65536
    assert sent > blocked_at
