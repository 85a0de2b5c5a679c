"""The dashboard: its routes (sign-in, the token cookie, static assets, the playground's
relay) and the graph it draws, through a real instance's management server, and its
pages in Debian's Chromium."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from helpers import wait_for
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
        logging.getLogger("market").info("priced %d of each fruit: %s", count, total)
        return {"price": total}


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
        assert page.status_code == 401 and 'name="token"' in page.text
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
    ({"path": "/a b"}, "path"),
    ({"path": "/", "headers": {"bad name": "x"}}, "headers"),
    ({"path": "/", "headers": {"x-ok": "line\r\nbreak"}}, "headers"),
])
def test_playground_refuses_a_bad_request_with_422_naming_the_field(
        served: Served, body: dict[str, Any], where: str) -> None:
    with client(served) as c:
        reply = c.post("/api/playground", json=body)
    assert reply.status_code == 422
    detail = reply.json()["detail"]
    assert any(where in d["loc"] for d in detail), detail


def test_playground_refuses_a_body_that_is_not_json_or_too_big(served: Served) -> None:
    with client(served) as c:
        reply = c.post("/api/playground", content=b"{not json")
        assert reply.status_code == 400 and "not JSON" in reply.json()["error"]
        big = json.dumps({"path": "/", "body": "x" * (dashboard.PLAYGROUND_MAX_REQUEST)})
        reply = c.post("/api/playground", content=big.encode())
        assert reply.status_code == 413 and "at most" in reply.json()["error"]


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


# -- the pages in a real browser ------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run"]
WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
UI_TIMEOUT_MS = 30_000      # a deadline for what the page shows, not a pace: it waits on it

needs_browser = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="browser tests need Chromium: apt-get install chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium for the module (Debian's, no download)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("browser tests need Chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Page:
    page: Any
    errors: list[str]       # uncaught exceptions and console errors the page reported


@pytest.fixture
def page(browser: Any, served: Served) -> Iterator[Page]:
    """A signed-in page at 1280x800 (the token from the address, then the cookie)."""
    context = browser.new_context(viewport=WIDE)
    context.set_default_timeout(UI_TIMEOUT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.goto(f"{served.url}/?token={served.token}")
    try:
        yield Page(tab, errors)
    finally:
        context.close()


def api(served: Served, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with client(served) as c:
        return c.request(method, path, **kwargs)


def confirm(tab: Any, expect: str) -> None:
    """The in-page dialog says what changes; confirm it."""
    dialog = tab.locator("dialog#confirm")
    dialog.wait_for(state="visible")
    assert expect in dialog.inner_text(), dialog.inner_text()
    tab.click("#confirm-ok")
    dialog.wait_for(state="hidden")


@needs_browser
def test_sign_in_page_takes_the_token_once_then_shows_the_overview(browser: Any,
                                                                   served: Served) -> None:
    context = browser.new_context(viewport=WIDE)
    try:
        tab = context.new_page()
        tab.goto(served.url + "/")
        assert tab.locator("input#token").is_visible()
        tab.fill("input#token", "wrong-token")
        tab.click("button[type=submit]")
        tab.locator(".error", has_text="not this instance").wait_for()
        tab.fill("input#token", served.token)
        tab.click("button[type=submit]")
        tab.locator("h1", has_text="Overview").wait_for()
        tab.goto(served.url + "/#/events")          # the cookie keeps it signed in
        tab.locator("h1", has_text="Events").wait_for()
    finally:
        context.close()


@needs_browser
def test_overview_finds_the_running_application(page: Page) -> None:
    card = page.page.locator('.app-card[data-app="market"]')
    card.locator('.state[data-state="RUNNING"]').wait_for()
    assert "/market" in card.inner_text() and "RUNNING" in card.inner_text()
    assert not page.errors, page.errors


@needs_browser
def test_traffic_shows_on_the_requests_chart(page: Page, served: Served) -> None:
    tab = page.page
    tab.goto(served.url + "/#/app/market")
    stop = threading.Event()

    def traffic() -> None:
        # steady traffic while the page waits: a rate needs two samples of the counter
        deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
        with httpx.Client(base_url=served.http_url, timeout=30) as c:
            while not stop.is_set() and time.monotonic() < deadline:
                assert c.get("/market", params={"n": 1}).status_code == 200

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        tab.wait_for_function("""() => {
            const el = document.querySelector('[data-chart="rps"]');
            return el !== null && Number(el.dataset.max) > 0; }""")
    finally:
        stop.set()
        sender.join()
    assert tab.locator('[data-chart="rps"] canvas').count() == 1
    tab.select_option("#window", "86400")          # widen to 24 hours (10 s resolution)
    tab.locator('[data-chart="rps"][data-window="86400"]').wait_for(state="attached")
    assert tab.locator("#banner").is_hidden()
    tab.select_option("#window", "900")
    assert not page.errors, page.errors


@needs_browser
def test_scale_to_three_from_the_page(page: Page, served: Served) -> None:
    tab = page.page
    tab.goto(served.url + "/#/app/market/dep/Market")
    tab.locator('[data-stat="target"] b', has_text="1").wait_for()
    tab.fill("#replicas", "3")
    tab.click("#scale")
    confirm(tab, "1 \u2192 3")
    tab.locator('[data-stat="running"] b', has_text="3").wait_for()
    assert tab.locator('#dep-replicas .state[data-state="RUNNING"]').count() == 3
    dep = fleet.status()["applications"]["market"]["deployments"]["Market"]
    assert dep["running_replicas"] == 3
    assert [r["state"] for r in dep["replicas"]] == ["RUNNING"] * 3
    assert not page.errors, page.errors


@needs_browser
def test_restart_a_replica_from_its_row(page: Page, served: Served) -> None:
    tab = page.page
    tab.goto(served.url + "/#/app/fruit/dep/OrangeStand")
    row = tab.locator("#dep-replicas tr[data-replica]").first
    row.locator('.state[data-state="RUNNING"]').wait_for()
    old = row.get_attribute("data-replica")
    row.locator("button[data-restart]").click()
    confirm(tab, old)
    tab.locator(f'#dep-replicas tr[data-replica="{old}"]').wait_for(state="detached")
    tab.locator('#dep-replicas .state[data-state="RUNNING"]').wait_for()
    tab.locator("#replaced", has_text="1 replaced").wait_for()
    assert not page.errors, page.errors


@needs_browser
def test_a_config_whose_constructor_raises_shows_the_error_and_rolls_back(
        page: Page, served: Served) -> None:
    good = {"import_path": "apps.dash_apps:good", "route_prefix": "/shop"}
    assert api(served, "PUT", "/api/applications/shop", json=good).status_code == 202
    tab = page.page
    tab.goto(served.url + "/#/app/shop")
    tab.locator('#app-title .state[data-state="RUNNING"]').wait_for()
    broken = {"import_path": "apps.dash_apps:broken", "route_prefix": "/shop"}
    assert api(served, "PUT", "/api/applications/shop", json=broken).status_code == 202
    problem = tab.locator("#app-problems .error-box")
    problem.locator("text=the shelves are empty").wait_for()
    assert "ValueError" in problem.inner_text()
    with httpx.Client(base_url=served.http_url, timeout=30) as c:   # the old one serves
        reply = c.get("/shop")
        assert reply.status_code == 200 and reply.json()["shop"] == "open"
    tab.click("#app-problems a:has-text('roll back')")
    tab.locator('.revision[data-revision="1"] button[data-rollback="1"]').click()
    confirm(tab, "apps.dash_apps:good")
    tab.locator('#c-status .state[data-state="RUNNING"]').wait_for()
    tab.locator('.revision[data-revision="3"] .state[data-state="current"]').wait_for()
    status = fleet.status()["applications"]["shop"]
    assert status["status"] == "RUNNING"
    assert page.errors == [], page.errors


@needs_browser
def test_config_applied_from_the_page_and_a_stale_edit_refused(page: Page,
                                                              served: Served) -> None:
    base = {"import_path": "apps.dash_apps:good", "route_prefix": "/stock"}
    assert api(served, "PUT", "/api/applications/stock", json=base).status_code == 202
    tab = page.page
    tab.goto(served.url + "/#/config/stock")
    editor = tab.locator("#c-edit")
    editor.wait_for()
    tab.locator('#c-status .state[data-state="RUNNING"]').wait_for()
    wanted = {**base, "deployments": [{"name": "Shop", "num_replicas": 2}]}
    editor.fill(json.dumps(wanted))
    # someone else changes the application meanwhile: the page's edit is now stale
    assert api(served, "PUT", "/api/applications/stock",
               json={**base, "deployments": [{"name": "Shop", "max_ongoing_requests": 7}]}
               ).status_code == 202
    tab.click("#c-apply")
    confirm(tab, "num_replicas: 2")
    tab.locator("#toast.bad", has_text="someone changed it").wait_for()
    assert api(served, "GET", "/api/applications/stock").json()["revision"] == 2
    tab.click("#c-reset")                  # drop the edit: the page shows revision 2
    tab.locator('.revision[data-revision="2"] .state[data-state="current"]').wait_for()
    editor.fill(json.dumps(wanted))
    tab.click("#c-apply")
    confirm(tab, "num_replicas: 2")
    tab.locator('.revision[data-revision="3"] .state[data-state="current"]').wait_for()
    tab.goto(served.url + "/#/app/stock/dep/Shop")
    tab.locator('[data-stat="running"] b', has_text="2").wait_for()
    assert fleet.status()["applications"]["stock"]["deployments"]["Shop"][
        "running_replicas"] == 2
    assert not [e for e in page.errors if "412" not in e], page.errors


@needs_browser
def test_playground_request_id_leads_to_its_log_lines(page: Page, served: Served) -> None:
    tab = page.page
    tab.goto(served.url + "/#/playground?app=market")
    tab.locator("#pg-app option", has_text="market").wait_for(state="attached")
    tab.fill("#pg-path", "/market?n=4")
    tab.click("#pg-send")
    link = tab.locator("#pg-rid a")
    link.wait_for()
    rid = link.inner_text()
    assert "200" in tab.inner_text("#pg-status")
    assert '"price":20.0' in tab.inner_text("#pg-body-out").replace(" ", "")
    assert rid in tab.inner_text("#pg-curl") or "curl" in tab.inner_text("#pg-curl")
    assert "httpx.request" in tab.inner_text("#pg-python")
    link.click()
    assert f"request_id={rid}" in tab.url
    line = tab.locator(f'#log-lines .line[data-request-id="{rid}"]',
                       has_text="priced 4 of each fruit")
    line.first.wait_for()
    assert not page.errors, page.errors


PAGES = ["", "app/fruit", "app/market", "app/market/dep/Market", "logs?application=market",
         "events", "config", "config/market", "playground"]


@needs_browser
def test_every_page_at_both_sizes_renders_without_errors_or_overflow(
        browser: Any, served: Served, tmp_path_factory: pytest.TempPathFactory) -> None:
    shots = tmp_path_factory.mktemp("dashboard-screenshots")
    for size, viewport in (("wide", WIDE), ("phone", PHONE)):
        context = browser.new_context(viewport=viewport)
        context.set_default_timeout(UI_TIMEOUT_MS)
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
        tab.on("console", lambda m, errors=errors: errors.append(m.text)
               if m.type == "error" else None)
        try:
            tab.goto(f"{served.url}/?token={served.token}")
            for name in PAGES:
                tab.goto(f"{served.url}/#/{name}")
                # drawn from the API once: the page's own element says so
                tab.locator("#page > .view[data-ready]").wait_for()
                assert tab.locator("#banner").is_hidden(), tab.inner_text("#banner")
                # a state reads without colour: a word, and an icon beside it
                for badge in tab.locator(".state").all():
                    assert badge.inner_text().strip() and badge.locator(
                        "[aria-hidden=true]").count() == 1, badge.inner_html()
                width = tab.evaluate("() => document.documentElement.scrollWidth")
                assert width <= viewport["width"], f"{name or 'overview'} at {size}: {width}px"
                path = shots / f"{size}-{name.split('?')[0].replace('/', '_') or 'overview'}.png"
                tab.screenshot(path=str(path), full_page=True)
                assert path.stat().st_size > 0
        finally:
            context.close()
        assert not errors, (size, errors)


@needs_browser
def test_delete_an_application_from_its_page(page: Page, served: Served) -> None:
    spec = {"import_path": "apps.dash_apps:good", "route_prefix": "/gone"}
    assert api(served, "PUT", "/api/applications/gone", json=spec).status_code == 202
    tab = page.page
    tab.goto(served.url + "/#/app/gone")
    tab.locator('#app-title .state[data-state="RUNNING"]').wait_for()
    tab.click("#app-delete")
    confirm(tab, "route /gone stops serving")
    wait_for(lambda: "gone" not in fleet.status()["applications"], 60)
    tab.goto(served.url + "/#/")
    tab.locator('.app-card[data-app="market"]').wait_for()
    assert tab.locator('.app-card[data-app="gone"]').count() == 0


@needs_browser
def test_an_autoscaling_decision_is_marked_on_the_replicas_chart_with_its_reason(
        page: Page, served: Served) -> None:
    spec = {"import_path": "apps.dash_apps:good", "route_prefix": "/lazy",
            "deployments": [{"name": "Shop", "autoscaling_config": {
                "min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                "upscale_delay_s": 0}}]}
    assert api(served, "PUT", "/api/applications/lazy", json=spec).status_code == 202
    tab = page.page
    tab.goto(served.url + "/#/app/lazy/dep/Shop")
    # the chart has the history from before the decision, so the decision falls inside it
    tab.wait_for_function("""() => {
        const el = document.querySelector('[data-chart="replicas"]');
        return el !== null && Number(el.dataset.points) > 0; }""")
    with httpx.Client(base_url=served.http_url, timeout=60) as c:
        assert c.get("/lazy").status_code == 200       # scales from zero to serve it
    reason = "a call is waiting on a deployment scaled to zero"
    tab.locator("#dep-scaling li", has_text=reason).wait_for()
    mark = tab.locator(f'[data-chart="replicas"] .mark[title*="{reason}"]')
    mark.wait_for()
    assert "0 \u2192 1" in mark.get_attribute("title")
    assert not page.errors, page.errors
