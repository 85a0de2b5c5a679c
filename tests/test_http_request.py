"""What an ingress method sees of an HTTP request, method routing by header, and the
proxy's own endpoints, over a real socket against real replicas."""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import Iterator

import httpx
import pytest
from starlette.requests import Request

import fleet


@fleet.deployment
class Inspect:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, request: Request) -> dict:
        body = await request.body()
        return {"method": request.method, "path": request.url.path,
                "root_path": request.scope["root_path"], "route_path": request.scope["path"],
                "query": dict(request.query_params), "cookies": request.cookies,
                "header": request.headers.get("x-thing"), "client": list(request.client or []),
                "body": body.decode(), "web": isinstance(request, Request),
                "scheme": request.url.scheme}

    async def json_echo(self, request: Request) -> dict:
        return {"json": await request.json()}

    async def form_echo(self, request: Request) -> dict:
        form = await request.form()
        out = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                out[key] = {"filename": value.filename, "content": (await value.read()).decode()}
            else:
                out[key] = value
        return out

    async def stream_echo(self, request: Request) -> dict:
        parts = [chunk async for chunk in request.stream()]
        return {"bytes": sum(len(p) for p in parts), "ends_empty": parts[-1] == b""}

    def sync_method(self, request: Request) -> str:
        return f"sync {request.query_params.get('n')}"

    # the test's four requests fill a batch, which then runs at once: the wait only has
    # to outlast the time a loaded machine takes to bring the four through the proxy
    @fleet.batch(max_batch_size=4, batch_wait_timeout_s=2.0)
    async def batched(self, requests: list) -> list:
        values = [(await r.json())["v"] for r in requests]
        return [{"v": v, "batch": len(values)} for v in values]


@pytest.fixture(scope="module")
def url(shared_instance) -> Iterator[str]:
    fleet.run(Inspect.bind(), name="inspect", route_prefix="/inspect")
    fleet.run(Inspect.bind(), name="root", route_prefix="/")
    yield shared_instance.http_url


def test_request_carries_method_path_query_headers_cookies_client_body(url):
    r = httpx.post(f"{url}/inspect/a/b?x=1&y=two", content=b"payload",
                   headers={"x-thing": "yes"}, cookies={"session": "abc"})
    assert r.status_code == 200
    got = r.json()
    assert got["method"] == "POST"
    assert got["query"] == {"x": "1", "y": "two"}
    assert got["header"] == "yes"
    assert got["cookies"] == {"session": "abc"}
    assert got["client"][0] == "127.0.0.1"
    assert got["body"] == "payload"
    assert got["web"] is True


def test_forwarded_headers_from_a_loopback_proxy_name_the_client_and_scheme(url):
    # a reverse proxy on this machine (a trusted address) says who the client was
    got = httpx.get(f"{url}/inspect", headers={"x-forwarded-for": "203.0.113.7",
                                               "x-forwarded-proto": "https"}).json()
    assert got["client"][0] == "203.0.113.7"
    assert got["scheme"] == "https"
    plain = httpx.get(f"{url}/inspect").json()
    assert plain["client"][0] == "127.0.0.1" and plain["scheme"] == "http"


def test_head_request_gets_the_head_without_the_body(url):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("HEAD", "/inspect")
    r = conn.getresponse()
    assert r.status == 200
    assert int(r.getheader("content-length")) > 0
    assert r.read() == b""
    conn.request("GET", "/inspect")         # the connection is still good for the next
    assert conn.getresponse().read().startswith(b"{")
    conn.close()


def test_route_prefix_is_mounted_like_an_asgi_mount(url):
    got = httpx.get(f"{url}/inspect/a/b").json()
    assert got["root_path"] == "/inspect"
    assert got["route_path"] == "/inspect/a/b"     # full path, as Starlette's Mount leaves it
    assert got["path"] == "/inspect/a/b"
    at_root = httpx.get(f"{url}/other/path").json()
    assert at_root["root_path"] == "" and at_root["route_path"] == "/other/path"
    # prefixes match whole path segments: /inspectors is not under /inspect
    assert httpx.get(f"{url}/inspectors").json()["root_path"] == ""


def test_json_body(url):
    r = httpx.post(f"{url}/inspect", json={"a": [1, 2]},
                   headers={"X-SERVE-CALL-METHOD": "json_echo"})
    assert r.json() == {"json": {"a": [1, 2]}}


def test_urlencoded_form(url):
    r = httpx.post(f"{url}/inspect", data={"name": "fleet", "n": "3"},
                   headers={"X-SERVE-CALL-METHOD": "form_echo"})
    assert r.json() == {"name": "fleet", "n": "3"}


def test_multipart_form_with_file(url):
    r = httpx.post(f"{url}/inspect", data={"field": "v"},
                   files={"upload": ("notes.txt", b"file body", "text/plain")},
                   headers={"X-SERVE-CALL-METHOD": "form_echo"})
    assert r.json() == {"field": "v", "upload": {"filename": "notes.txt",
                                                  "content": "file body"}}


def test_stream_reads_the_body(url):
    r = httpx.post(f"{url}/inspect", content=b"x" * 100_000,
                   headers={"X-SERVE-CALL-METHOD": "stream_echo"})
    assert r.json() == {"bytes": 100_000, "ends_empty": True}


def test_call_method_header_reaches_sync_methods(url):
    r = httpx.get(f"{url}/inspect?n=7", headers={"X-SERVE-CALL-METHOD": "sync_method"})
    assert r.status_code == 200 and r.text == "sync 7"


def test_unknown_call_method_is_404_naming_deployment_and_method(url):
    r = httpx.get(f"{url}/inspect", headers={"X-SERVE-CALL-METHOD": "nope"})
    assert r.status_code == 404
    body = r.json()
    assert body["deployment"] == "Inspect" and body["method"] == "nope"
    assert "nope" in body["error"]


def test_call_method_header_works_on_batched_methods(url):
    async def go() -> list[dict]:
        async with httpx.AsyncClient() as client:
            rs = await asyncio.gather(*[
                client.post(f"{url}/inspect", json={"v": i},
                            headers={"X-SERVE-CALL-METHOD": "batched"}) for i in range(4)])
        return [r.json() for r in rs]

    got = asyncio.run(go())
    assert sorted(g["v"] for g in got) == [0, 1, 2, 3]
    assert max(g["batch"] for g in got) > 1


def test_no_route_is_404(shared_instance, url):
    fleet.delete("root")
    try:
        r = httpx.get(f"{url}/nothing/here")
        assert r.status_code == 404
        assert "/nothing/here" in r.json()["error"]
        assert "/inspect" in r.json()["routes"]     # what the client could have asked for
    finally:
        fleet.run(Inspect.bind(), name="root", route_prefix="/")


def test_healthz_and_routes(url):
    r = httpx.get(f"{url}/-/healthz")
    assert r.status_code == 200 and r.text == "success"
    routes = httpx.get(f"{url}/-/routes").json()
    assert routes["/inspect"] == "inspect" and routes["/"] == "root"
