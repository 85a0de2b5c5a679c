"""ServeRequest: a handle call to a Request-taking method reads like an HTTP request."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from starlette.requests import Request

import fleet


class Blob:
    """An object HTTP could not carry."""

    def __init__(self, size: int) -> None:
        self.payload = bytes(size)


@fleet.deployment
class Model:
    async def __call__(self, request: Request) -> dict:
        out = {"web": isinstance(request, Request),
               "serve_request": isinstance(request, fleet.ServeRequest),
               "headers": dict(request.headers), "query": dict(request.query_params),
               "body": (await request.body()).decode(), "method": request.method}
        if request.headers.get("content-type") == "application/json":
            out["json"] = await request.json()
            out["form"] = dict(await request.form())
        return out

    async def data(self, request: Request) -> int:
        return len(request.data.payload)

    async def with_extra(self, request: Request, scale: int = 1) -> dict:
        return {"scale": scale, "query": dict(request.query_params)}

    def plain(self, x: int) -> int:
        return x + 1


@fleet.deployment
class Front:
    def __init__(self, model: fleet.DeploymentHandle) -> None:
        self.model = model

    async def __call__(self, request: Request) -> dict:
        await request.body()
        return await self.model.remote(request)


@pytest.fixture(scope="module")
def handle(shared_instance) -> Iterator[fleet.DeploymentHandle]:
    yield fleet.run(Model.bind(), name="model", route_prefix="/model")


def test_http_headers_option_becomes_headers(handle):
    got = handle.options(http_headers={"X-Key": "v"}).remote().result()
    assert got["headers"]["x-key"] == "v"
    assert got["serve_request"] and not got["web"]


def test_kwargs_become_query_params(handle):
    assert handle.remote(a="b").result()["query"] == {"a": "b"}


def test_dict_is_json_and_form(handle):
    got = handle.remote({"k": 1}).result()
    assert got["json"] == {"k": 1}
    assert got["form"] == {"k": 1}
    assert got["method"] == "POST"


def test_string_is_body(handle):
    got = handle.remote("long string").result()
    assert got["body"] == "long string"


def test_any_python_object_is_data_without_http_limits(handle):
    assert handle.data.remote(Blob(5_000_000)).result() == 5_000_000


def test_other_keyword_parameters_stay_arguments(handle):
    got = handle.with_extra.remote(None, scale=3, page="2").result()
    assert got == {"scale": 3, "query": {"page": "2"}}


def test_methods_without_a_request_parameter_get_plain_arguments(handle):
    assert handle.plain.remote(1).result() == 2


def test_isinstance_tells_web_from_python_callers(shared_instance, handle):
    over_http = httpx.get(f"{shared_instance.http_url}/model").json()
    assert over_http["web"] is True and over_http["serve_request"] is False
    from_python = handle.remote().result()
    assert from_python["web"] is False and from_python["serve_request"] is True


def test_a_real_request_passed_through_a_handle_arrives_as_a_request(shared_instance):
    fleet.run(Front.bind(Model.bind()), name="front", route_prefix="/front")
    got = httpx.post(f"{shared_instance.http_url}/front?q=1", json={"from": "web"},
                     headers={"x-trace": "t1"}).json()
    assert got["web"] is True and got["serve_request"] is False
    assert got["json"] == {"from": "web"}
    assert got["query"] == {"q": "1"} and got["headers"]["x-trace"] == "t1"


def test_serve_request_is_not_a_starlette_request():
    assert not issubclass(fleet.ServeRequest, Request)
