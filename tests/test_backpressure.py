"""Backpressure and timeouts on the memory backend (the routers' and replicas' logic,
HTTP through the proxy's app): refusals past max_queued_requests (handles and HTTP),
flat memory under a sustained 10x overload, and timeouts that cancel the replica's
call. Over real sockets: test_http_limits, test_grpc_limits."""

from __future__ import annotations

import asyncio
import time

import httpx
import psutil
import pytest
from helpers import wait_for

import fleet


@fleet.deployment(max_ongoing_requests=1000)
class Gate:
    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self) -> None:
        await self.event.wait()

    async def open(self) -> None:
        self.event.set()


@fleet.deployment(max_ongoing_requests=1, max_queued_requests=2)
class Narrow:
    def __init__(self, gate) -> None:
        self.gate = gate

    async def __call__(self, request=None) -> str:
        await self.gate.wait.remote()
        return "ok"


@fleet.deployment(max_ongoing_requests=2, max_queued_requests=20)
class Busy:
    async def __call__(self, n: int) -> int:
        await asyncio.sleep(0.02)       # 2 at a time: about 100 calls/s of capacity
        return n


@fleet.deployment
class Slow:
    def __init__(self) -> None:
        self.cancelled = 0

    async def __call__(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def cancellations(self) -> int:
        return self.cancelled


def _wait_for(cond, timeout_s: float = 10.0):
    return wait_for(cond, timeout_s)


def test_handle_calls_past_max_queued_fail_at_once(memory_instance) -> None:
    gate = fleet.run(Gate.bind(), name="gate", route_prefix=None)
    handle = fleet.run(Narrow.bind(gate), name="narrow", route_prefix=None)
    calls = [handle.remote() for _ in range(10)]
    refused, accepted = [], []
    for c in calls[3:]:
        started = time.monotonic()
        with pytest.raises(fleet.BackPressureError, match="max_queued_requests=2"):
            c.result(timeout_s=5)
        refused.append(time.monotonic() - started)
    assert max(refused) < 1.0
    gate.open.remote().result()
    accepted = [c.result(timeout_s=10) for c in calls[:3]]
    assert accepted == ["ok"] * 3


def test_http_past_max_queued_gets_503_with_retry_after(memory_instance) -> None:
    gate = fleet.run(Gate.bind(), name="gate", route_prefix=None)
    fleet.run(Narrow.bind(gate), name="narrow", route_prefix="/narrow")

    async def go() -> list[httpx.Response]:
        async with memory_instance.async_http() as client:
            tasks = [asyncio.ensure_future(client.get("/narrow")) for _ in range(10)]
            while sum(t.done() for t in tasks) < 7:     # the refusals come back first
                await asyncio.wait([t for t in tasks if not t.done()],
                                   return_when=asyncio.FIRST_COMPLETED)
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: gate.open.remote().result())
            return list(await asyncio.gather(*tasks))

    responses = asyncio.run(go())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 3 + [503] * 7
    assert all(r.headers.get("retry-after") for r in responses if r.status_code == 503)


def _rss_mb() -> float:
    me = psutil.Process()
    procs = [me] + me.children(recursive=True)
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2 ** 20


def test_sustained_10x_overload_keeps_memory_flat_and_completes_accepted(memory_instance) -> None:
    handle = fleet.run(Busy.bind(), name="busy", route_prefix=None)
    accepted = refused = 0
    inflight: list = []
    samples: list[float] = []
    rate = 1000                      # about 10x what Busy can serve
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < 4.0:
        due = int((time.monotonic() - started) * rate)
        while sent < due:
            inflight.append(handle.remote(sent))
            sent += 1
        still = []
        for resp in inflight:
            if resp._cfut.done():
                try:
                    resp.result()
                    accepted += 1
                except fleet.BackPressureError:
                    refused += 1
            else:
                still.append(resp)
        inflight = still
        if not samples or time.monotonic() - started > len(samples) * 0.5:
            samples.append(_rss_mb())
        time.sleep(0.005)            # pacing of the load generator
    for resp in inflight:
        try:
            resp.result(timeout_s=10)
            accepted += 1
        except fleet.BackPressureError:
            refused += 1
    assert accepted + refused == sent
    assert refused > accepted        # overloaded: most calls were refused at once
    assert accepted >= 100           # and the accepted ones were served
    warm = samples[2]                # after the first second
    print(f"overload: sent={sent} accepted={accepted} refused={refused} "
          f"rss_mb={[round(x) for x in samples]}")
    assert max(samples[2:]) - warm < 40, samples


def test_timeout_raises_and_cancels_the_replica_call(memory_instance) -> None:
    handle = fleet.run(Slow.bind(), name="slow", route_prefix=None)
    started = time.monotonic()
    with pytest.raises(fleet.RequestTimeoutError, match="timeout_s=0.3"):
        handle.options(timeout_s=0.3).remote().result()
    assert time.monotonic() - started < 2
    _wait_for(lambda: handle.cancellations.remote().result() == 1)
