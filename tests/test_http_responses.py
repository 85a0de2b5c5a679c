"""Return values become HTTP responses; streams reach the client chunk by chunk."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydantic
import pytest
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

import fleet


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Item(pydantic.BaseModel):
    name: str
    price: float


def _touch(path: str) -> None:
    Path(path).write_text("ran")


@fleet.deployment
class Returns:
    async def __call__(self, request: Request):
        kind = request.query_params["kind"]
        values = {
            "str": "hello", "bytes": b"\x00\x01", "dict": {"a": 1}, "list": [1, "two"],
            "int": 7, "float": 1.5, "none": None, "dataclass": Point(1, 2),
            "pydantic": Item(name="pear", price=0.5),
        }
        if kind in values:
            return values[kind]
        if kind == "custom":
            resp = Response("teapot-ish", status_code=123, media_type="text/x-custom",
                            headers={"x-extra": "1"})
            resp.set_cookie("flavour", "mint")
            return resp
        if kind == "stream_status":
            async def parts():
                yield b"partial;"
                yield b"failure"
            return StreamingResponse(parts(), status_code=500, media_type="text/plain")
        if kind == "background":
            return JSONResponse({"ok": True},
                                background=BackgroundTask(_touch, request.query_params["path"]))
        raise ValueError(kind)

    def sync_gen(self, request: Request):
        for i in range(3):
            yield f"s{i},"

    def where_gen(self, request: Request):
        try:
            asyncio.get_running_loop()
            yield "on the event loop"
        except RuntimeError:
            yield "in a worker thread"


@fleet.deployment
class Gate:
    """An event a test opens from the driver: proves a chunk left before the next one
    was even produced."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}

    def _event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    async def open(self, name: str) -> None:
        self._event(name).set()

    async def wait(self, name: str) -> None:
        await self._event(name).wait()


@fleet.deployment
class Streamer:
    def __init__(self, gate: fleet.DeploymentHandle) -> None:
        self.gate = gate

    async def __call__(self, request: Request):
        name = request.query_params["gate"]

        async def chunks():
            yield b"first;"
            await self.gate.wait.remote(name)
            yield b"second;"

        return StreamingResponse(chunks(), media_type="text/plain")

    async def agen(self, request: Request):
        name = request.query_params["gate"]
        yield "one;"
        await self.gate.wait.remote(name)
        yield {"two": 2}


@pytest.fixture(scope="module")
def url(shared_instance) -> Iterator[str]:
    fleet.run(Returns.bind(), name="returns", route_prefix="/r")
    fleet.run(Streamer.bind(Gate.bind()), name="stream", route_prefix="/s")
    yield shared_instance.http_url


@pytest.mark.parametrize("kind,ctype,expected", [
    ("str", "text/plain; charset=utf-8", b"hello"),
    ("bytes", "application/octet-stream", b"\x00\x01"),
    ("dict", "application/json", b'{"a":1}'),
    ("list", "application/json", b'[1,"two"]'),
    ("int", "application/json", b"7"),
    ("float", "application/json", b"1.5"),
    ("none", "application/json", b"null"),
    ("dataclass", "application/json", b'{"x":1,"y":2}'),
    ("pydantic", "application/json", b'{"name":"pear","price":0.5}'),
])
def test_return_values_convert(url, kind, ctype, expected):
    r = httpx.get(f"{url}/r", params={"kind": kind})
    assert r.status_code == 200
    assert r.headers["content-type"] == ctype
    assert r.content == expected


@pytest.mark.parametrize("value", [
    "hello", "héllo ☃", "", b"\x00\x01", bytearray(b"ba"), memoryview(b"mv"),
    {"a": 1}, [1, "two"], 7, 1.5, None, {"nested": {"x": [True, None]}},
])
def test_whole_reply_matches_the_starlette_response_it_stands_for(value):
    # the replica answers str, bytes and JSON-able values without Starlette's objects:
    # what goes to the proxy must be what to_response's Response would have sent
    from fleet._replica.http import to_response, whole_reply
    reply = whole_reply(value)
    assert reply is not None
    response = to_response(value)
    assert reply == (response.status_code, response.raw_headers, bytes(response.body))


def test_whole_reply_leaves_responses_and_generators_to_starlette():
    from starlette.responses import PlainTextResponse

    from fleet._replica.http import whole_reply

    async def agen():
        yield b"x"

    assert whole_reply(PlainTextResponse("x")) is None
    assert whole_reply(agen()) is None
    assert whole_reply(i for i in [1]) is None


def test_starlette_response_passes_through_with_status_headers_cookies(url):
    # httpx takes any 1xx for an interim response; http.client (like `requests`) only
    # skips 100, so it reads the 123 response the deployment sent.
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/r?kind=custom")
    r = conn.getresponse()
    assert r.status == 123
    assert r.read() == b"teapot-ish"
    assert r.getheader("content-type").startswith("text/x-custom")
    assert r.getheader("x-extra") == "1"
    assert "flavour=mint" in r.getheader("set-cookie")
    conn.close()


def test_streamed_response_keeps_its_own_status_code(url):
    # a 500 the app streams itself is a response like any other, not fleet's error
    r = httpx.get(f"{url}/r", params={"kind": "stream_status"})
    assert r.status_code == 500
    assert r.content == b"partial;failure"


def test_background_task_runs_after_the_response(url, tmp_path):
    marker = tmp_path / "bg"
    r = httpx.get(f"{url}/r", params={"kind": "background", "path": str(marker)})
    assert r.json() == {"ok": True}
    deadline = time.monotonic() + 10
    while not marker.exists():
        assert time.monotonic() < deadline, "the background task never ran"
        time.sleep(0.01)


def _gate():
    return fleet.get_deployment_handle("Gate", "stream")


def _read_gated(url: str, path: str, name: str) -> list[bytes]:
    got = []
    with httpx.stream("GET", f"{url}{path}", params={"gate": name}, timeout=10) as r:
        assert r.status_code == 200
        it = r.iter_raw()
        got.append(next(it))
        # The replica is now blocked before its second chunk: the first one came
        # through on its own, unbuffered. Let it go on.
        _gate().open.remote(name).result()
        got.extend(it)
    return got


def test_streaming_response_is_not_buffered(url):
    assert _read_gated(url, "/s", "streaming") == [b"first;", b"second;"]


def test_async_generator_streams_chunk_by_chunk(url):
    chunks = []
    with httpx.stream("GET", f"{url}/s", params={"gate": "agen"},
                      headers={"X-SERVE-CALL-METHOD": "agen"}, timeout=10) as r:
        it = r.iter_raw()
        chunks.append(next(it))
        _gate().open.remote("agen").result()
        chunks.extend(it)
    assert chunks == [b"one;", b'{"two": 2}']


def test_sync_generator_streams(url):
    r = httpx.get(f"{url}/r", headers={"X-SERVE-CALL-METHOD": "sync_gen"})
    assert r.status_code == 200 and r.text == "s0,s1,s2,"


def test_sync_generator_runs_off_the_event_loop(url):
    r = httpx.get(f"{url}/r", headers={"X-SERVE-CALL-METHOD": "where_gen"})
    assert r.text == "in a worker thread"
