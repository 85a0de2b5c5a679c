"""@fleet.ingress: FastAPI and Starlette apps served inside replicas, with ``self``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pydantic
import pytest
from fastapi import Depends, FastAPI, WebSocket, WebSocketDisconnect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

import fleet

api = FastAPI(title="counter")


def page_size(size: int = 10) -> int:
    return min(size, 50)


class Out(pydantic.BaseModel):
    name: str
    count: int


@fleet.deployment
@fleet.ingress(api)
class Counter:
    def __init__(self, start: int) -> None:
        self.count = start
        self.ws_events: list[str] = []

    @api.get("/items/{item_id}")
    def item(self, item_id: int, q: str | None = None) -> dict:
        return {"item_id": item_id, "q": q, "count": self.count}

    @api.post("/incr/{by}")
    async def incr(self, by: int) -> dict:
        self.count += by
        return {"count": self.count}

    @api.get("/page")
    def page(self, size: int = Depends(page_size)) -> dict:
        return {"size": size}

    @api.get("/model", response_model=Out)
    def model(self) -> dict:
        return {"name": "counter", "count": self.count, "secret": "dropped"}

    @api.websocket("/ws")
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                self.count += 1
                await websocket.send_text(f"{text}:{self.count}")
        except WebSocketDisconnect:
            self.ws_events.append("ws: disconnect")
        except asyncio.CancelledError:
            self.ws_events.append("ws: cancelled")
            raise

    @api.websocket("/idle")
    async def idle(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.ws_events.append("idle: accepted")
        try:
            await asyncio.Event().wait()       # never reads: misses the disconnect
        except asyncio.CancelledError:
            self.ws_events.append("idle: cancelled")
            raise

    def events(self) -> list[str]:
        return self.ws_events

    def plain_method(self, request: Request) -> str:
        return f"plain {self.count}"


@api.get("/free")
def free_function() -> str:
    return "no self needed"


@contextlib.asynccontextmanager
async def life(app: FastAPI) -> AsyncIterator[dict]:
    Path(app.state.marker).write_text("started")
    yield {"greeting": "set by the lifespan"}
    Path(app.state.marker).write_text("stopped")


life_api = FastAPI(lifespan=life)


@fleet.deployment
@fleet.ingress(life_api)
class Lived:
    def __init__(self, marker: str) -> None:
        life_api.state.marker = marker      # the replica's copy of the app

    @life_api.get("/")
    def read(self, request: Request) -> dict:
        return {"state": request.state.greeting}


@contextlib.asynccontextmanager
async def broken_life(app: FastAPI) -> AsyncIterator[None]:
    raise RuntimeError("the model file is missing")
    yield


broken_api = FastAPI(lifespan=broken_life)


@fleet.deployment
@fleet.ingress(broken_api)
class BrokenLife:
    pass


star = Starlette()


@fleet.deployment
@fleet.ingress(star)
class Greeter:
    def __init__(self) -> None:
        self.greeting = "hello"

    async def greet(self, request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"{self.greeting} {request.path_params['name']}")

    star.add_route("/greet/{name}", greet)


@pytest.fixture(scope="module")
def url(shared_instance) -> Iterator[str]:
    fleet.run(Counter.bind(5), name="counter", route_prefix="/api")
    fleet.run(Greeter.bind(), name="greeter", route_prefix="/star")
    yield shared_instance.http_url


def test_fastapi_route_sees_self_and_path_query_params(url):
    r = httpx.get(f"{url}/api/items/3", params={"q": "x"})
    assert r.status_code == 200
    assert r.json()["item_id"] == 3 and r.json()["q"] == "x"
    before = r.json()["count"]
    assert httpx.post(f"{url}/api/incr/2").json() == {"count": before + 2}
    assert httpx.get(f"{url}/api/items/3").json()["count"] == before + 2


def test_fastapi_dependency_injection(url):
    assert httpx.get(f"{url}/api/page").json() == {"size": 10}
    assert httpx.get(f"{url}/api/page", params={"size": 500}).json() == {"size": 50}


def test_fastapi_validation_error_is_422(url):
    r = httpx.get(f"{url}/api/items/not-a-number")
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["path", "item_id"]


def test_fastapi_response_model_filters_fields(url):
    got = httpx.get(f"{url}/api/model").json()
    assert set(got) == {"name", "count"}


def test_fastapi_plain_functions_still_work(url):
    assert httpx.get(f"{url}/api/free").json() == "no self needed"


def test_openapi_and_docs_under_route_prefix(url):
    schema = httpx.get(f"{url}/api/openapi.json").json()
    assert schema["info"]["title"] == "counter"
    params = schema["paths"]["/items/{item_id}"]["get"]["parameters"]
    assert {p["name"] for p in params} == {"item_id", "q"}     # no `self` parameter
    docs = httpx.get(f"{url}/api/docs")
    assert docs.status_code == 200
    assert "/api/openapi.json" in docs.text


def test_websocket_route_through_the_proxy(url):
    ws_url = url.replace("http://", "ws://") + "/api/ws"
    with ws_connect(ws_url, open_timeout=10) as ws:
        ws.send("a")
        first = ws.recv(timeout=10)
        ws.send("b")
        second = ws.recv(timeout=10)
    name_a, count_a = first.split(":")
    name_b, count_b = second.split(":")
    assert (name_a, name_b) == ("a", "b") and int(count_b) == int(count_a) + 1


def _wait_for_event(event: str) -> None:
    handle = fleet.get_app_handle("counter")
    deadline = time.monotonic() + 30
    while event not in handle.events.remote().result():
        assert time.monotonic() < deadline, f"no {event!r} in {handle.events.remote().result()}"
        time.sleep(0.02)


def test_websocket_client_gone_while_the_app_reads_is_a_disconnect_not_a_cancel(url):
    with ws_connect(url.replace("http://", "ws://") + "/api/ws", open_timeout=10) as ws:
        ws.send("x")
        ws.recv(timeout=10)
    _wait_for_event("ws: disconnect")
    assert "ws: cancelled" not in fleet.get_app_handle("counter").events.remote().result()


def test_websocket_client_gone_while_the_app_is_idle_cancels_its_call(url):
    with ws_connect(url.replace("http://", "ws://") + "/api/idle", open_timeout=10):
        _wait_for_event("idle: accepted")
    # the app never reads the disconnect: after the grace its call is cancelled, so the
    # dead connection does not hold a replica slot
    _wait_for_event("idle: cancelled")


def test_websocket_to_unknown_path_is_refused(url):
    with pytest.raises(InvalidStatus) as refused:
        with ws_connect(url.replace("http://", "ws://") + "/api/nowhere", open_timeout=10):
            pass
    assert refused.value.response.status_code == 403


def test_call_method_header_is_an_ordinary_header_to_an_ingress_app(url):
    # the app answers (it has no route "/"), not the method the header names
    r = httpx.get(f"{url}/api", headers={"X-SERVE-CALL-METHOD": "plain_method"})
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_route_methods_stay_callable_from_handles(url):
    handle = fleet.get_app_handle("counter")
    got = handle.item.remote(item_id=9).result()
    assert got["item_id"] == 9


def test_handle_call_to_an_ingress_apps_call_says_what_to_do_instead(url):
    with pytest.raises(fleet.MethodNotFoundError, match="serves an ASGI app"):
        fleet.get_app_handle("counter").remote().result()


def test_starlette_app_route_sees_self(url):
    r = httpx.get(f"{url}/star/greet/fleet")
    assert r.status_code == 200 and r.text == "hello fleet"
    assert httpx.get(f"{url}/star/missing").status_code == 404


def test_fastapi_lifespan_runs_in_the_replica_and_its_state_reaches_requests(url, tmp_path):
    marker = tmp_path / "life"
    fleet.run(Lived.bind(str(marker)), name="lived", route_prefix="/lived")
    assert marker.read_text() == "started"          # before the replica was ready
    assert httpx.get(f"{url}/lived/").json() == {"state": "set by the lifespan"}
    fleet.delete("lived")
    deadline = time.monotonic() + 30
    while marker.read_text() != "stopped":
        assert time.monotonic() < deadline, "the lifespan's shutdown never ran"
        time.sleep(0.02)


def test_failing_lifespan_startup_fails_the_deployment_with_its_error(url):
    with pytest.raises(fleet.DeploymentFailedError, match="the model file is missing"):
        fleet.run(BrokenLife.bind(), name="broken_life", route_prefix="/broken_life")
    fleet.delete("broken_life")


def test_openapi_json_is_valid_json(url):
    json.loads(httpx.get(f"{url}/api/openapi.json").text)
