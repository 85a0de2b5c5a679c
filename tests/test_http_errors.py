"""Refusals and cancellation over HTTP: 503 with Retry-After, and a client that goes
away cancels the replica's coroutine."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

import fleet


@fleet.deployment(max_ongoing_requests=1000)
class Latch:
    """Single's one call waits here: a deployment of its own, as Single's replica
    refuses other calls (is_holding, let_go) while that call holds it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = False

    async def hold(self) -> None:
        self.holding = True
        await self.release.wait()
        self.holding = False

    async def is_holding(self) -> bool:
        return self.holding

    async def let_go(self) -> None:
        self.release.set()


@fleet.deployment(max_ongoing_requests=1, max_queued_requests=0)
class Single:
    def __init__(self, latch) -> None:
        self.latch = latch

    async def __call__(self, request: Request) -> str:
        await self.latch.hold.remote()
        return "done"


@fleet.deployment
class Hang:
    async def __call__(self, request: Request) -> None:
        marker = Path(request.query_params["marker"])
        marker.with_suffix(".started").write_text("")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            marker.write_text("CancelledError")
            raise


@fleet.deployment
class HangStream:
    async def __call__(self, request: Request):
        marker = Path(request.query_params["marker"])
        yield "first"
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            marker.write_text("CancelledError")
            raise


@fleet.deployment
class Crash:
    def __call__(self, request: Request) -> None:
        os._exit(1)                 # the process dies with the request in flight


@fleet.deployment
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("cannot load the model")


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def url(shared_instance) -> Iterator[str]:
    fleet.run(Single.bind(Latch.bind()), name="single", route_prefix="/single")
    fleet.run(Hang.bind(), name="hang", route_prefix="/hang")
    fleet.run(HangStream.bind(), name="hang_stream", route_prefix="/hang_stream")
    yield shared_instance.http_url


def test_full_queue_is_503_with_retry_after(url):
    handle = fleet.get_deployment_handle("Latch", "single")
    first: list[httpx.Response] = []
    t = threading.Thread(target=lambda: first.append(httpx.get(f"{url}/single", timeout=20)))
    t.start()
    try:
        wait_for(lambda: handle.is_holding.remote().result(), "the first request to start")
        r = httpx.get(f"{url}/single")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"] == "the deployment's queue is full; retry later"
    finally:
        handle.let_go.remote().result()
        t.join(20)
    assert first[0].status_code == 200 and first[0].text == "done"


def test_no_healthy_replica_is_503_with_retry_after(url):
    with pytest.raises(fleet.DeploymentFailedError):
        fleet.run(Broken.bind(), name="broken", route_prefix="/broken")
    try:
        r = httpx.get(f"{url}/broken")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        body = r.json()
        # the constructor's message and traceback stay in the logs and fleet.status()
        assert body == {"error": "the deployment failed to start",
                        "request_id": r.headers["x-request-id"]}
        assert "cannot load the model" not in r.text
    finally:
        fleet.delete("broken")


def test_replica_dying_mid_request_is_503_at_once(url):
    fleet.run(Crash.bind(), name="crash", route_prefix="/crash")
    try:
        # a death not noticed would leave the request hanging until the client's timeout
        # (a bound on the elapsed time would be the loaded machine's speed, not fleet's)
        r = httpx.get(f"{url}/crash", timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        body = r.json()
        assert body == {"error": "the replica serving the request died",
                        "request_id": r.headers["x-request-id"]}
    finally:
        fleet.delete("crash")


def test_client_disconnect_cancels_the_replica_coroutine(url, tmp_path):
    marker = tmp_path / "hang"
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET /hang?marker={marker} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        wait_for(marker.with_suffix(".started").exists, "the replica to start the call")
    wait_for(lambda: marker.exists() and marker.read_text() == "CancelledError",
             "CancelledError in the replica")


def test_client_disconnect_mid_stream_cancels_the_replica_generator(url, tmp_path):
    marker = tmp_path / "stream"
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET /hang_stream?marker={marker} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        got = b""
        while b"first" not in got:
            got += s.recv(4096)
    wait_for(lambda: marker.exists() and marker.read_text() == "CancelledError",
             "CancelledError in the replica's generator")
