"""The HTTP proxy on Granian (``http_options={"server": "granian"}``): same behaviour."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

import fleet

pytest.importorskip("granian")


@fleet.deployment
class Echo:
    async def __call__(self, request: Request) -> dict:
        return {"path": request.url.path, "root": request.scope["root_path"],
                "query": dict(request.query_params), "body": (await request.body()).decode()}

    async def chunks(self, request: Request):
        for i in range(3):
            yield f"chunk{i}\n"

    async def slow(self, request: Request) -> str:
        await asyncio.sleep(10)
        return "late"

    def boom(self, request: Request) -> None:
        raise ValueError("broken model")


@pytest.fixture
def granian_url():
    fleet.shutdown()
    fleet.start(http_options={
        # seconds: every request here goes through it on a possibly loaded machine
        "port": 0, "server": "granian", "request_timeout_s": 3.0, "access_log": False,
        "middlewares": [Middleware(CORSMiddleware, allow_origins=["*"],
                                   allow_methods=["*"])]})
    try:
        proxy = fleet.status()["proxies"]["http"]
        assert proxy["server"] == "granian"
        fleet.run(Echo.bind(), route_prefix="/echo")
        yield f"http://127.0.0.1:{proxy['port']}"
    finally:
        fleet.shutdown()


def test_granian_proxy_serves_requests_streams_and_errors(granian_url):
    with httpx.Client(base_url=granian_url, timeout=30) as c:
        r = c.post("/echo/a?b=1", content=b"payload")
        assert r.json() == {"path": "/echo/a", "root": "/echo", "query": {"b": "1"},
                            "body": "payload"}
        r = c.get("/echo", headers={"X-SERVE-CALL-METHOD": "chunks"})
        assert r.text == "chunk0\nchunk1\nchunk2\n"
        r = c.get("/echo", headers={"X-SERVE-CALL-METHOD": "boom"})
        assert r.status_code == 500 and r.json()["error"] == "internal error"
        assert r.json()["request_id"] == r.headers["x-request-id"]
        assert c.get("/echo", headers={"X-SERVE-CALL-METHOD": "slow"}).status_code == 504
        assert c.get("/nowhere").status_code == 404
        pre = c.options("/echo", headers={"Origin": "http://x.example",
                                          "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "*"


def test_granian_port_taken_fails_start_with_a_clear_error():
    fleet.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(fleet.FleetError, match=f"cannot listen on 127.0.0.1:{port}"):
            fleet.start(http_options={"port": port, "server": "granian"})
    fleet.shutdown()
