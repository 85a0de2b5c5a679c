"""The dashboard: its routes (sign-in, the token cookie, static assets, the playground's
relay) and the graph it draws, through a real instance's management server, and its
pages in Debian's Chromium."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

import fleet
from fleet import _api
from fleet._deployment import build_plans
from fleet._manage import dashboard
from fleet.drivers import prepare_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC = os.path.join(ROOT, "fleet", "_manage", "static")
# what would make the page fetch something from another host (a CDN, a font service)
OUTSIDE = re.compile(r"""(src|href)=["']?(https?:)?//|url\(["']?(https?:)?//|"""
                     r"""(from|import\()\s*["'](https?:)?//|@import""")


@fleet.deployment
class Stand:
    def __init__(self, price: float) -> None:
        self.price = price

    def __call__(self, count: int) -> float:
        return count * self.price


@fleet.deployment
class Market:
    def __init__(self, orange: Any, apple: Any) -> None:
        self.stands = {"orange": orange, "apple": apple}

    async def __call__(self, request: Any) -> dict[str, Any]:
        count = int(request.query_params.get("n", "1"))
        total = 0.0
        for stand in self.stands.values():
            total += await stand.remote(count)
        return {"price": total, "request_id": fleet.get_request_id()
                if hasattr(fleet, "get_request_id") else None}


def market_app() -> fleet.Application:
    return Market.bind(Stand.options(name="OrangeStand").bind(2.0),
                       Stand.options(name="AppleStand").bind(3.0))


@dataclass
class Served:
    url: str            # the management server: API and dashboard
    http_url: str       # the instance's HTTP proxy
    token: str


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """One instance with its management server, HTTP and gRPC on free ports, running the
    seed's FruitMarket graph and an HTTP market."""
    sys.path.insert(0, ROOT)
    from examples import grpc_fruit_market

    fleet.shutdown()
    token = secrets.token_urlsafe(24)
    fleet.start(http_options={"host": "127.0.0.1", "port": 0}, grpc_options={"port": 0},
                management_options={"host": "127.0.0.1", "port": 0, "token": token})
    inst = _api._instance
    assert isinstance(inst, _api.Instance) and inst.ops is not None
    try:
        fleet.run(grpc_fruit_market.my_deployment, name="fruit", route_prefix="/fruit")
        fleet.run(market_app(), name="market", route_prefix="/market")
        port = fleet.status()["proxies"]["http"]["port"]
        yield Served(f"http://127.0.0.1:{inst.ops.port}", f"http://127.0.0.1:{port}", token)
    finally:
        fleet.shutdown()


def client(served: Served, auth: bool = True) -> httpx.Client:
    headers = {"authorization": f"Bearer {served.token}"} if auth else {}
    return httpx.Client(base_url=served.url, headers=headers, timeout=30,
                         follow_redirects=False)


# -- graph edges, recorded when an application is built ----------------------------

def test_seed_fruit_market_plans_record_the_driver_and_three_edges() -> None:
    sys.path.insert(0, ROOT)
    from examples import grpc_fruit_market

    app = prepare_app(grpc_fruit_market.my_deployment).app
    plans = {p.name: p for p in build_plans(app, "fruit")}
    assert set(plans) == {"DefaultgRPCDriver", "FruitMarket", "OrangeStand", "AppleStand"}
    assert plans["DefaultgRPCDriver"].calls == ("FruitMarket",)
    assert plans["FruitMarket"].calls == ("OrangeStand", "AppleStand")
    assert plans["OrangeStand"].calls == plans["AppleStand"].calls == ()


def test_a_handle_passed_twice_is_one_edge_and_a_shared_child_is_one_node() -> None:
    shared = Stand.options(name="Shared").bind(1.0)
    plans = {p.name: p for p in build_plans(Market.bind(shared, [shared, {"x": shared}]), "a")}
    assert set(plans) == {"Market", "Shared"}
    assert plans["Market"].calls == ("Shared",)


def test_graph_route_shows_the_running_fruit_market(served: Served) -> None:
    with client(served) as c:
        reply = c.get("/api/applications/fruit/graph")
    assert reply.status_code == 200
    graph = reply.json()
    nodes = {n["deployment"]: n for n in graph["nodes"]}
    assert set(nodes) == {"DefaultgRPCDriver", "FruitMarket", "OrangeStand", "AppleStand"}
    assert [n for n, v in nodes.items() if v["ingress"]] == ["DefaultgRPCDriver"]
    assert all(v["status"] == "HEALTHY" and v["running_replicas"] == v["target_replicas"] == 1
               for v in nodes.values())
    assert sorted((e["from"], e["to"]) for e in graph["edges"]) == [
        ("DefaultgRPCDriver", "FruitMarket"), ("FruitMarket", "AppleStand"),
        ("FruitMarket", "OrangeStand")]


def test_graph_of_an_unknown_application_is_404_naming_the_running_ones(served: Served
                                                                         ) -> None:
    with client(served) as c:
        reply = c.get("/api/applications/nope/graph")
    assert reply.status_code == 404
    body = reply.json()
    assert "'nope'" in body["error"] and "fruit" in body["error"]
    assert body["request_id"]


# -- access: token, cookie, sign-in page --------------------------------------------

def test_without_a_token_only_the_sign_in_page_and_static_assets_are_served(
        served: Served) -> None:
    with client(served, auth=False) as c:
        page = c.get("/")
        assert page.status_code == 200 and 'name="token"' in page.text
        assert "fleet dashboard" not in page.text          # not the app's page
        assert c.get("/static/app.css").status_code == 200
        for method, path in [("GET", "/api/applications/fruit/graph"),
                             ("POST", "/api/playground")]:
            reply = c.request(method, path, json={"path": "/"})
            assert reply.status_code == 401, path
            assert "token" in reply.json()["error"]
        wrong = c.get("/api/applications/fruit/graph",
                      headers={"authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401


def test_token_in_the_address_sets_the_cookie_and_redirects_to_the_page(served: Served
                                                                        ) -> None:
    with client(served, auth=False) as c:
        reply = c.get("/", params={"token": served.token})
        assert reply.status_code == 303 and reply.headers["location"] == "/"
        cookie = reply.headers["set-cookie"]
        assert cookie.startswith(f"{dashboard.COOKIE}=") and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower()
        page = c.get("/")                     # the client keeps the cookie
        assert page.status_code == 200 and "fleet dashboard" in page.text
        assert c.get("/api/applications/fruit/graph").status_code == 200


def test_a_wrong_token_in_the_address_gets_the_sign_in_page_with_the_reason(
        served: Served) -> None:
    with client(served, auth=False) as c:
        reply = c.get("/", params={"token": "wrong"})
    assert reply.status_code == 401
    assert "not this instance" in reply.text and 'name="token"' in reply.text
    assert "set-cookie" not in reply.headers


def test_static_assets_are_served_and_a_missing_one_is_404(served: Served) -> None:
    with client(served, auth=False) as c:
        js = c.get("/static/app.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert c.get("/static/vendor/uplot/uPlot.iife.min.js").status_code == 200
        assert c.get("/static/nothing.js").status_code == 404
        for path in ("/static/../dashboard.py", "/static/%2e%2e/dashboard.py",
                     "/static/..%2fdashboard.py"):
            reply = c.get(path)
            assert reply.status_code in (401, 404) and "import" not in reply.text, path


# -- the page ships in the package, offline and small --------------------------------

def test_dashboard_assets_weigh_under_500_kb_and_name_no_outside_address() -> None:
    total = 0
    for folder, _, files in os.walk(STATIC):
        for name in files:
            path = os.path.join(folder, name)
            total += os.path.getsize(path)
            if name.endswith((".html", ".js", ".css")):
                text = open(path, encoding="utf-8").read()
                assert not OUTSIDE.search(text), f"{name} loads from elsewhere"
    assert total < 500 * 1024, f"the dashboard weighs {total} bytes"
    assert os.path.exists(os.path.join(STATIC, "vendor", "uplot", "LICENSE"))


def test_package_data_includes_the_dashboard() -> None:
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["fleet"]
    assert "_manage/static/*" in data and "_manage/static/vendor/uplot/*" in data


# -- the playground: relayed to the HTTP proxy ----------------------------------------

def test_playground_relays_to_the_proxy_with_status_latency_and_request_id(
        served: Served) -> None:
    with client(served) as c:
        reply = c.post("/api/playground", json={
            "method": "GET", "path": "/market?n=2", "headers": {"x-probe": "1"}, "body": ""})
    assert reply.status_code == 200
    out = reply.json()
    assert out["status"] == 200 and '"price":10.0' in out["body"].replace(" ", "")
    assert out["request_id"] and out["latency_ms"] > 0
    headers = {k.lower(): v for k, v in out["headers"]}
    assert headers["x-request-id"] == out["request_id"]


def test_playground_passes_the_proxy_errors_through_as_they_are(served: Served) -> None:
    with client(served) as c:
        reply = c.post("/api/playground", json={"method": "POST", "path": "/nowhere",
                                                "body": "x"})
    assert reply.status_code == 200
    out = reply.json()
    assert out["status"] == 404 and "no application serves path" in out["body"]


@pytest.mark.parametrize("body, where", [
    ({"method": "GET"}, "path"),
    ({"path": "no-slash"}, "path"),
    ({"path": "/", "method": "BREW"}, "method"),
    ({"path": "/", "headers": {"a": 1}}, "headers"),
    ({"path": "/", "extra": True}, "extra"),
])
def test_playground_refuses_a_bad_request_with_422_naming_the_field(
        served: Served, body: dict[str, Any], where: str) -> None:
    with client(served) as c:
        reply = c.post("/api/playground", json=body)
    assert reply.status_code == 422
    detail = reply.json()["detail"]
    assert any(where in d["loc"] for d in detail), detail


def test_playground_refuses_a_body_that_is_not_json(served: Served) -> None:
    with client(served) as c:
        reply = c.post("/api/playground", content=b"{not json")
    assert reply.status_code == 422 and reply.json()["error"]


def test_playground_without_an_http_proxy_says_how_to_get_one() -> None:
    app = Starlette(routes=dashboard.routes("t" * 16, lambda: None))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
            return await c.post("/api/playground", json={"path": "/"})

    reply = asyncio.run(go())
    assert reply.status_code == 503 and "--port" in reply.json()["error"]


def test_playground_with_its_proxy_gone_answers_502_not_500() -> None:
    app = Starlette(routes=dashboard.routes("t" * 16, lambda: "http://127.0.0.1:9"))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
            return await c.post("/api/playground", json={"path": "/x"})

    reply = asyncio.run(go())
    assert reply.status_code == 502 and "could not reach the HTTP proxy" in reply.json()["error"]


@pytest.mark.parametrize("info, base", [
    ({"host": "127.0.0.1", "port": 8000}, "http://127.0.0.1:8000"),
    ({"host": "0.0.0.0", "port": 8000}, "http://127.0.0.1:8000"),
    ({"host": "::", "port": 8000}, "http://[::1]:8000"),
    ({"error": "port taken", "index": 0}, None),
])
def test_playground_reaches_the_proxy_at_a_connectable_address(info: dict[str, Any],
                                                                base: str | None) -> None:
    assert dashboard.proxy_base({"http": info}) == base
    assert dashboard.proxy_base({}) is None
