"""Frames: a reply too large for one frame fails that call alone, with a clear error;
the connection and the other calls on it go on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import fleet
from fleet._wire import frames

LIMIT = 1 << 20


@fleet.deployment(max_ongoing_requests=10)
class Big:
    def __init__(self) -> None:
        # a lower frame limit in this replica, so a test need not send 2 GiB
        frames.MAX_FRAME = LIMIT

    async def blob(self, n: int) -> bytes:
        return b"x" * n

    async def slow_small(self, started: bool) -> str:
        await asyncio.sleep(0.2)
        return "small"

    async def chunks(self, n: int):
        yield b"a" * 10
        yield b"x" * n


@pytest.fixture(scope="module")
def handle() -> Iterator[fleet.DeploymentHandle]:
    fleet.shutdown()
    fleet.start(http_options={"port": 0})
    try:
        yield fleet.run(Big.bind(), name="big", route_prefix=None)
    finally:
        fleet.shutdown()


def test_a_reply_over_the_frame_limit_fails_that_call_alone(handle):
    async def go() -> tuple[BaseException | str, str, bytes]:
        other = handle.slow_small.remote(True)          # in flight on the same connection
        try:
            await handle.blob.remote(2 * LIMIT)
            big: BaseException | str = "no error"
        except ValueError as exc:
            big = exc
        return big, await other, await handle.blob.remote(10)

    big, other, after = asyncio.run(go())
    assert isinstance(big, frames.FrameTooLargeError)
    assert "could not be sent back" in str(big) and f"{LIMIT}-byte limit" in str(big)
    assert "send it in parts" in str(big)
    assert other == "small" and after == b"x" * 10


def test_a_streamed_item_over_the_limit_ends_that_stream_with_the_error(handle):
    got = []
    with pytest.raises(frames.FrameTooLargeError, match="limit"):
        for item in handle.options(stream=True).chunks.remote(2 * LIMIT):
            got.append(item)
    assert got == [b"a" * 10]
    assert handle.blob.remote(3).result() == b"xxx"


def test_arguments_over_the_limit_fail_the_call_at_the_caller(monkeypatch):
    monkeypatch.setattr(frames, "MAX_FRAME", 100)
    with pytest.raises(frames.FrameTooLargeError, match="over the 100-byte limit"):
        frames.encode(frames.CALL, 1, ("m", (b"x" * 200,), {}, None))
    assert frames.decode(frames.encode(frames.CALL, 1, "ok")[frames.HEADER_SIZE:]) == "ok"
