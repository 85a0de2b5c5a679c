"""http_options: middlewares, request_timeout_s, root_path, max_body_bytes, the access
log and the 500 error log, each against a proxy whose stderr the test reads."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import start_instance
from helpers import stderr_into
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

import fleet
from fleet._cli import load_config


@fleet.deployment
class Service:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Request) -> dict:
        self.calls += 1
        return {"root_path": request.scope["root_path"], "path": request.scope["path"],
                "bytes": len(await request.body())}

    def count(self) -> int:
        return self.calls

    async def hang(self, request: Request) -> None:
        marker = Path(request.query_params["marker"])
        marker.with_suffix(".started").write_text("")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            marker.write_text("cancelled")
            raise

    async def fail(self, request: Request) -> None:
        raise ValueError("the model exploded")

    async def chain(self, request: Request) -> list[str]:
        return request.headers.getlist("x-chain")

    async def slow_stream(self, request: Request):
        marker = Path(request.query_params["marker"])
        yield b"first"
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            marker.write_text("cancelled")
            raise


class Tag:
    """A pure ASGI middleware that adds its name to the request's x-chain headers."""

    def __init__(self, app, name: str) -> None:
        self.app = app
        self.name = name.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "headers": [*scope["headers"], (b"x-chain", self.name)]}
        await self.app(scope, receive, send)


# request_timeout_s of the module's proxy: every request of these tests goes through it,
# so it is seconds (a loaded machine can take one to serve a request, or to start the
# call the timeout tests then see cancelled)
TIMEOUT_S = 3.0


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("proxy") / "stderr.log"
    fleet.shutdown()
    with stderr_into(log):
        inst = start_instance(
            middlewares=[Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"]),
                         Middleware(Tag, name="outer"), Middleware(Tag, name="inner")],
            request_timeout_s=TIMEOUT_S, root_path="/base", max_body_bytes=1000)
    try:
        fleet.run(Service.bind(), name="svc", route_prefix="/svc")
        yield inst.http_url, log
    finally:
        fleet.shutdown()


def test_cors_preflight_answered_by_middleware(proxy):
    url, _ = proxy
    r = httpx.options(f"{url}/svc", headers={"Origin": "https://example.com",
                                             "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert len(r.headers["x-request-id"]) == 32     # a middleware's own answer has one too
    r = httpx.get(f"{url}/svc", headers={"Origin": "https://example.com"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_middlewares_wrap_in_order_the_first_outermost(proxy):
    url, _ = proxy
    r = httpx.get(f"{url}/svc", headers={"X-SERVE-CALL-METHOD": "chain"})
    assert r.json() == ["outer", "inner"]


def test_root_path_with_or_without_the_prefix_in_the_request(proxy):
    url, _ = proxy
    for path in ("/base/svc/x", "/svc/x"):      # as sent, or stripped by a reverse proxy
        got = httpx.get(f"{url}{path}").json()
        assert got["root_path"] == "/base/svc"
        assert got["path"] == "/base/svc/x"


def test_request_timeout_is_504_and_cancels_the_replica_call(proxy, tmp_path):
    url, _ = proxy
    marker = tmp_path / "hang"
    started = time.monotonic()
    r = httpx.get(f"{url}/svc", params={"marker": str(marker)},
                  headers={"X-SERVE-CALL-METHOD": "hang"}, timeout=60)
    assert r.status_code == 504
    # it waited for request_timeout_s, and then no longer than the machine's slowness
    assert 0.9 * TIMEOUT_S < time.monotonic() - started < TIMEOUT_S + 30
    assert "request_timeout_s" in r.json()["error"]
    wait_for(lambda: marker.exists() and marker.read_text() == "cancelled",
             "the replica's coroutine to be cancelled")


def test_request_timeout_cuts_a_started_stream_and_cancels_the_replica_call(proxy, tmp_path):
    url, _ = proxy
    marker = tmp_path / "stream"
    started = time.monotonic()
    with httpx.stream("GET", f"{url}/svc", params={"marker": str(marker)}, timeout=60,
                      headers={"X-SERVE-CALL-METHOD": "slow_stream"}) as r:
        assert r.status_code == 200          # the head went out: no 504 can follow
        chunks = r.iter_raw()
        assert next(chunks) == b"first"
        with pytest.raises(httpx.RemoteProtocolError):
            list(chunks)                     # the connection is cut, not ended cleanly
    assert 0.9 * TIMEOUT_S < time.monotonic() - started < TIMEOUT_S + 30
    wait_for(lambda: marker.exists() and marker.read_text() == "cancelled",
             "the replica's generator to be cancelled")


def test_body_over_max_body_bytes_is_413_before_the_replica_sees_it(proxy):
    url, _ = proxy
    handle = fleet.get_app_handle("svc")
    before = handle.count.remote().result()
    assert httpx.post(f"{url}/svc", content=b"x" * 1001).status_code == 413

    def chunked():                       # no content-length: counted while reading
        for _ in range(3):
            yield b"y" * 400

    assert httpx.post(f"{url}/svc", content=chunked()).status_code == 413
    assert handle.count.remote().result() == before
    ok = httpx.post(f"{url}/svc", content=b"x" * 1000)
    assert ok.status_code == 200 and ok.json()["bytes"] == 1000


def test_expect_100_continue_over_the_limit_gets_413_without_continue(proxy):
    url, _ = proxy
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /svc HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n"
                  b"expect: 100-continue\r\n\r\n")
        first = s.recv(4096)
    assert first.startswith(b"HTTP/1.1 413")


def test_access_log_line_per_request(proxy):
    url, log = proxy
    httpx.get(f"{url}/svc/logged?x=1")
    wait_for(lambda: "GET /svc/logged 200" in log.read_text(), "the access log line")
    line = next(ln for ln in log.read_text().splitlines() if "GET /svc/logged 200" in ln)
    assert "app=svc" in line and "replica=Service-" in line
    ms = line.split("GET /svc/logged 200 ")[1].split("ms")[0]
    assert float(ms) >= 0


def test_every_response_is_in_the_access_log_with_its_request_id(proxy):
    url, log = proxy
    answers = [
        httpx.get(f"{url}/svc/logged?x=2"),                         # the app's 200
        httpx.get(f"{url}/nowhere"),                                # the proxy's 404
        httpx.post(f"{url}/svc", content=b"x" * 2000),              # 413: max_body_bytes
        httpx.get(f"{url}/-/healthz"),                              # the proxy's own
        httpx.get(f"{url}/svc", headers={"x-big": "y" * 70_000}),   # 431: the head's limit
    ]
    assert [r.status_code for r in answers] == [200, 404, 413, 200, 431]
    for r in answers:
        rid = r.headers["x-request-id"]
        wait_for(lambda rid=rid: f"id={rid}" in log.read_text(), f"the line of {rid}")
        line = next(ln for ln in log.read_text().splitlines() if f"id={rid}" in ln)
        assert f" {r.status_code} " in line and "fleet.access" in line


def test_log_lines_share_one_timestamp_format(proxy):
    url, log = proxy
    httpx.get(f"{url}/svc", headers={"X-SERVE-CALL-METHOD": "fail"})   # an error report too
    wait_for(lambda: "failed" in log.read_text(), "an error line")
    stamped = [ln for ln in log.read_text().splitlines() if ln[:2] == "20"]
    assert stamped
    for line in stamped:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [A-Z]+ ", line), line


def test_user_exception_is_500_with_request_id_and_logged_traceback(proxy):
    url, log = proxy
    r = httpx.get(f"{url}/svc", headers={"X-SERVE-CALL-METHOD": "fail"})
    assert r.status_code == 500
    body = r.json()
    error_id = r.headers["x-request-id"]
    assert body == {"error": "internal error", "request_id": error_id}
    wait_for(lambda: f"request {error_id} failed" in log.read_text(), "the error log entry")
    text = log.read_text()
    entry = text[text.index(f"request {error_id} failed"):]
    assert "app svc, deployment Service" in entry
    assert "Traceback" in entry and "the model exploded" in entry
    assert "raise ValueError" in entry


def test_yaml_middlewares_and_access_log_off(tmp_path):
    config = tmp_path / "fleet.yaml"
    config.write_text(
        "http_options:\n"
        "  access_log: false\n"
        "  middlewares:\n"
        "    - cls: starlette.middleware.cors.CORSMiddleware\n"
        "      allow_origins: ['https://app.example']\n"
        "      allow_methods: ['GET']\n"
        "applications: []\n")
    options = load_config(str(config)).http_options
    options.port = 0
    log = tmp_path / "stderr.log"
    fleet.shutdown()
    with stderr_into(log):
        fleet.start(http_options=options)
    try:
        port = fleet.status()["proxies"]["http"]["port"]
        fleet.run(Service.bind(), name="quiet", route_prefix="/quiet")
        r = httpx.options(f"http://127.0.0.1:{port}/quiet",
                          headers={"Origin": "https://app.example",
                                   "Access-Control-Request-Method": "GET"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        for _ in range(3):
            assert httpx.get(f"http://127.0.0.1:{port}/quiet/x").status_code == 200
    finally:
        fleet.shutdown()
    assert "fleet.access" not in log.read_text()


def test_bad_middleware_fails_start_with_a_clear_error():
    fleet.shutdown()
    with pytest.raises(fleet.FleetError, match="middlewares"):
        fleet.start(http_options={"port": 0, "middlewares": ["no.such.module.Middleware"]})
    fleet.shutdown()

