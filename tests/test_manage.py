"""The management API, as a client sees it: a real instance in this process serving the
API on a free loopback port, real HTTP (httpx), real replicas."""

from __future__ import annotations

import json
import os
import socket

import httpx
import pytest
from helpers import wait_for

import fleet
from fleet import _api

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def api():
    """(management client with the token, HTTP proxy URL) of one instance."""
    fleet.shutdown()
    fleet.start(http_options={"port": 0}, management_options={"port": 0})
    inst = _api._instance
    assert isinstance(inst, _api.Instance) and inst.ops is not None
    client = httpx.Client(base_url=inst.ops.url(), timeout=30,
                          headers={"Authorization": f"Bearer {inst.ops.token}"})
    proxy = f"http://127.0.0.1:{fleet.status()['proxies']['http']['port']}"
    try:
        yield client, proxy
    finally:
        client.close()
        fleet.shutdown()


def put(client: httpx.Client, name: str, body: dict, **kwargs) -> httpx.Response:
    return client.put(f"/api/applications/{name}", json=body,
                      params={"app_dir": HERE}, **kwargs)


def converged(client: httpx.Client, name: str) -> dict:
    def done():
        app = client.get(f"/api/applications/{name}").json()
        return app if app.get("converged") else None
    return wait_for(done, 60)


def greeter(greeting: str, prefix: str) -> dict:
    return {"import_path": "apps.cli_apps:build", "route_prefix": prefix,
            "args": {"greeting": greeting}}


def test_every_path_needs_the_token(api):
    client, _ = api
    url = str(client.base_url)
    for path in ("/api/instance", "/api/applications", "/api/openapi.json", "/api/nosuch"):
        r = httpx.get(url + path)
        assert r.status_code == 401, path
        assert "token" in r.json()["error"] and r.json()["request_id"]
    r = httpx.get(url + "/")                # the dashboard's sign-in page, nothing else
    assert r.status_code == 401 and 'name="token"' in r.text
    r = httpx.get(url + "/api/instance", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.put(url + "/api/applications/x", json=greeter("x", "/x"))
    assert r.status_code == 401
    assert httpx.get(url + "/?token=wrong").status_code == 401


def test_the_dashboard_address_sets_a_cookie(api):
    client, _ = api
    token = client.headers["Authorization"].split()[1]
    with httpx.Client(base_url=str(client.base_url)) as browser:
        r = browser.get(f"/?token={token}")
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert "httponly" in r.headers["set-cookie"].lower()
        assert browser.get("/api/instance").status_code == 200      # the cookie alone


def test_instance(api):
    client, _ = api
    info = client.get("/api/instance").json()
    assert info["pid"] == os.getpid() and info["proxies"]["http"]["port"] > 0
    assert info["management"]["port"] == client.base_url.port


def test_put_deploys_and_a_stale_etag_changes_nothing(api):
    client, proxy = api
    r = put(client, "etag", greeter("one", "/etag"))
    assert r.status_code == 202
    version = r.json()["version"]
    converged(client, "etag")
    assert httpx.get(proxy + "/etag").text == "one from fleet"
    r = client.get("/api/applications/etag")
    assert r.headers["etag"] == f'"{version}"'
    assert r.json()["deployments"]["Hello"]["status"] == "HEALTHY"

    stale = put(client, "etag", greeter("two", "/etag"), headers={"If-Match": '"999"'})
    assert stale.status_code == 412
    assert "someone changed it" in stale.json()["error"]
    assert client.get("/api/applications/etag").headers["etag"] == f'"{version}"'
    assert httpx.get(proxy + "/etag").text == "one from fleet"

    fresh = put(client, "etag", greeter("two", "/etag"), headers={"If-Match": f'"{version}"'})
    assert fresh.status_code == 202 and fresh.json()["version"] != version
    converged(client, "etag")
    assert httpx.get(proxy + "/etag").text == "two from fleet"
    # without If-Match: unconditional
    assert put(client, "etag", greeter("three", "/etag")).status_code == 202
    # If-Match "0": only if the application does not exist yet
    assert put(client, "etag", greeter("four", "/etag"),
               headers={"If-Match": '"0"'}).status_code == 412
    r = put(client, "etag-new", greeter("new", "/etag-new"), headers={"If-Match": '"0"'})
    assert r.status_code == 202


def test_a_failing_import_fails_only_that_application(api):
    client, proxy = api
    assert put(client, "good", greeter("fine", "/good")).status_code == 202
    converged(client, "good")
    r = put(client, "broken", {"import_path": "apps.nosuchmodule:app", "route_prefix": "/b"})
    assert r.status_code == 400
    assert r.json()["error"] == ("application 'broken': cannot import module "
                                 "'apps.nosuchmodule' (from 'apps.nosuchmodule:app'): no such "
                                 "module; check the path or pass --app-dir")
    r = put(client, "broken", {"import_path": "apps.cli_apps:failing_build"})
    assert r.status_code == 400
    assert "raised RuntimeError: no model configured" in r.json()["error"]
    assert client.get("/api/applications/broken").status_code == 404
    assert httpx.get(proxy + "/good").text == "fine from fleet"
    events = client.get("/api/events").json()["events"]
    assert any(e["kind"] == "deploy_failed" and e["application"] == "broken" for e in events)


def test_a_constructor_failure_keeps_the_previous_version_serving(api):
    client, proxy = api
    good = {"import_path": "apps.manage_apps:greeter", "route_prefix": "/keep",
            "args": {"greeting": "kept"}}
    assert put(client, "keep", good).status_code == 202
    converged(client, "keep")
    r = put(client, "keep", {**good, "args": {"greeting": "new", "fail": True}})
    assert r.status_code == 202
    app = wait_for(lambda: (a := client.get("/api/applications/keep").json())["status"]
                   == "DEPLOY_FAILED" and a, 60)
    message = app["deployments"]["Greeter"]["message"]
    assert "raised ValueError: cannot greet with 'new'" in message
    assert httpx.get(proxy + "/keep").text == "kept"
    # the next good deploy clears the failure
    assert put(client, "keep", {**good, "args": {"greeting": "again"}}).status_code == 202
    app = converged(client, "keep")
    assert app["status"] == "RUNNING" and not app["deployments"]["Greeter"]["message"]
    assert httpx.get(proxy + "/keep").text == "again"


@pytest.mark.parametrize("body,status,loc", [
    ({"import_path": 5}, 422, ["body", "import_path"]),
    ({"route_prefix": "/x"}, 422, ["body", "import_path"]),
    ({"import_path": "a:b", "replicas": 3}, 422, ["body", "replicas"]),
    ({"import_path": "a:b", "deployments": [{"name": "A", "num_replicas": -1}]}, 422,
     ["body", "deployments", 0]),
    ({"import_path": "a:b", "name": "other"}, 422, ["body", "name"]),
])
def test_bad_bodies_get_422_naming_the_field(api, body, status, loc):
    client, _ = api
    r = put(client, "bad", body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert any(d["loc"][:len(loc)] == loc for d in detail), detail
    assert r.json()["error"].startswith("invalid request body") or "name" in loc


def test_bad_json_and_huge_bodies(api):
    client, _ = api
    r = client.put("/api/applications/x", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.put("/api/applications/x", content=b"[1, 2]")
    assert r.status_code == 422
    r = client.put("/api/applications/x", content=b" " * (2 << 20))
    assert r.status_code == 413
    r = client.post("/api/applications/x/deployments/y/scale", json={"num_replicas": "many"})
    assert r.status_code == 404         # the application is checked first
    assert client.get("/api/events", params={"since": "yesterday"}).status_code == 422
    assert client.get("/api/config", params={"format": "xml"}).status_code == 422
    r = client.delete("/api/applications/nosuch")
    assert r.status_code == 404 and "no application named 'nosuch'" in r.json()["error"]
    r = client.post("/api/instance")
    assert r.status_code == 405 and r.json()["request_id"]


def test_scale_replicas_and_restart_one(api):
    client, _ = api
    assert put(client, "scaled", greeter("s", "/scaled")).status_code == 202
    converged(client, "scaled")
    base = "/api/applications/scaled/deployments/Hello"
    r = client.post(base + "/scale", json={"num_replicas": 2})
    assert r.status_code == 202
    app = converged(client, "scaled")
    assert app["deployments"]["Hello"]["target_replicas"] == 2
    rows = client.get(base + "/replicas").json()
    assert len(rows["replicas"]) == 2
    for row in rows["replicas"]:
        assert row["state"] == "RUNNING" and row["pid"] > 0 and row["rss_bytes"] > 0
        assert row["cpu_percent"] is not None and row["uptime_s"] >= 0 and row["node_id"]
    assert client.post(base + "/scale", json={"num_replicas": -1}).status_code == 422
    assert client.post(base + "/scale", json={}).status_code == 422
    victim = rows["replicas"][0]["replica_id"]
    r = client.post(f"{base}/replicas/{victim}/restart")
    assert r.status_code == 202
    assert client.post(f"{base}/replicas/nosuch/restart").status_code == 404

    def replaced():
        now = client.get(base + "/replicas").json()
        ids = {x["replica_id"] for x in now["replicas"] if x["state"] == "RUNNING"}
        return now if len(ids) == 2 and victim not in ids else None
    now = wait_for(replaced, 60)
    assert now["replaced"][-1]["replica_id"] == victim
    assert now["replaced"][-1]["reason"] == "restarted on request"
    dep = client.get(base).json()
    assert dep["replaced_total"] >= 1 and len(dep["replicas"]) >= 2


def test_revisions_and_rollback(api):
    client, proxy = api
    put(client, "rev", greeter("first", "/rev"))
    converged(client, "rev")
    put(client, "rev", greeter("second", "/rev"))
    converged(client, "rev")
    assert httpx.get(proxy + "/rev").text == "second from fleet"
    again = put(client, "rev", greeter("second", "/rev"))       # the same: no new revision
    assert again.status_code == 202 and again.json()["revision"] == 2
    revs = client.get("/api/applications/rev/revisions").json()["revisions"]
    assert [r["revision"] for r in revs] == [1, 2]
    assert revs[0]["config"]["args"] == {"greeting": "first"}
    assert [r["status"] for r in revs] == ["superseded", "current"]
    r = client.post("/api/applications/rev/rollback", json={})
    assert r.status_code == 202 and r.json()["revision"] == 3
    converged(client, "rev")
    assert httpx.get(proxy + "/rev").text == "first from fleet"
    r = client.post("/api/applications/rev/rollback", json={"to": 2})
    assert r.status_code == 202
    converged(client, "rev")
    assert httpx.get(proxy + "/rev").text == "second from fleet"
    revs = client.get("/api/applications/rev/revisions").json()["revisions"]
    assert revs[-1]["note"] == "rollback to revision 2"
    assert client.post("/api/applications/rev/rollback", json={"to": 99}).status_code == 404
    assert client.get("/api/applications/nosuch/revisions").status_code == 404


def test_graph_config_and_openapi(api):
    client, _ = api
    assert put(client, "graph", {"import_path": "apps.manage_apps:composed",
                                 "route_prefix": "/graph"}).status_code == 202
    converged(client, "graph")
    graph = client.get("/api/applications/graph/graph").json()
    assert {n["deployment"] for n in graph["nodes"]} == {"Front", "Back"}
    assert graph["edges"] == [{"from": "Front", "to": "Back"}]
    config = client.get("/api/config").json()
    names = [a["name"] for a in config["applications"]]
    assert "graph" in names
    text = client.get("/api/config", params={"format": "yaml"})
    assert text.headers["content-type"].startswith("text/yaml")
    assert "import_path: apps.manage_apps:composed" in text.text
    spec = client.get("/api/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/api/applications/{app}" in spec["paths"]
    assert "ApplicationConfig" in spec["components"]["schemas"]
    assert "fleet management API" in client.get("/api/docs").text


def test_events_stream(api):
    client, _ = api
    put(client, "events", greeter("e", "/events"))
    converged(client, "events")
    with client.stream("GET", "/api/events/stream", params={"since": 0}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        seen = []
        for line in lines:
            if line.startswith("data: "):
                event = json.loads(line[6:])
                seen.append(event)
                if event["kind"] == "deploy" and event["application"] == "events":
                    break
        # a new event arrives on the open stream
        assert client.post("/api/applications/events/deployments/Hello/scale",
                           json={"num_replicas": 1}).status_code == 202
        for line in lines:
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["kind"] == "scale":
                    assert event["application"] == "events"
                    break
    assert all({"time", "kind", "application", "deployment", "replica", "message"}
               <= set(e) for e in seen)


def test_delete(api):
    client, proxy = api
    put(client, "gone", greeter("g", "/gone"))
    converged(client, "gone")
    assert client.delete("/api/applications/gone").status_code == 202
    wait_for(lambda: client.get("/api/applications/gone").status_code == 404, 60)
    wait_for(lambda: httpx.get(proxy + "/gone").status_code == 404, 30)


def test_a_taken_management_port_fails_with_one_line():
    from fleet._api import Instance
    from fleet._config import GRPCOptions, HTTPOptions, ManagementOptions
    from fleet.exceptions import FleetError
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        inst = Instance(HTTPOptions(port=0), GRPCOptions(), register=False,
                        management=ManagementOptions(port=port))
        with pytest.raises(FleetError) as info:
            inst.start()
        assert f"the management server cannot listen on 127.0.0.1:{port}" in str(info.value)
        assert "\n" not in str(info.value)
        assert inst.closed


def test_readme_python_example_runs():
    """The management API's Python block in "Operating fleet", run as a user would."""
    import re
    import subprocess
    import sys
    root = os.path.dirname(HERE)
    with open(os.path.join(root, "README.md")) as f:
        text = f.read()
    section = text[text.index("\n### The management API\n"):]
    section = section[:section.index("\n### ", 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    out = subprocess.run([sys.executable, "-c", blocks[0]], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_metrics_public_opens_only_metrics(tmp_path):
    """management_options.metrics_public lets /metrics answer without the token; every
    other path still needs it."""
    import subprocess
    import sys
    script = (
        "import httpx, fleet\n"
        "fleet.start(http_options={'port': 0},\n"
        "            management_options=fleet.ManagementOptions(port=0,\n"
        "                                                       metrics_public=True))\n"
        "url = fleet.status()['management']['url']\n"
        "r = httpx.get(url + '/metrics')\n"
        "assert r.status_code == 200, r.text\n"
        "assert r.headers['content-type'].startswith('text/plain'), r.headers\n"
        "assert httpx.get(url + '/api/instance').status_code == 401\n"
        "assert httpx.get(url + '/api/metrics').status_code == 401\n"
        "fleet.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=HERE)
    assert out.returncode == 0, out.stderr


def test_metrics_need_the_token_by_default(api):
    client, _ = api
    assert httpx.get(str(client.base_url) + "/metrics").status_code == 401


def test_an_added_route_is_one_entry_and_a_crash_is_a_json_500(api):
    """Routes are a list of (method, path, handler(request, ops)); a handler that raises
    answers 500 with a JSON body and a request id, and the server goes on."""
    import asyncio

    from starlette.responses import JSONResponse

    from fleet._manage.server import build_app

    async def pid(request, ops):
        return JSONResponse({"pid": ops.instance.controller is not None and os.getpid()})

    async def boom(request, ops):
        raise RuntimeError("a bug")

    ops = _api._instance.ops
    app = build_app(ops, [("GET", "/api/pid", pid), ("GET", "/api/boom", boom)])
    token = {"Authorization": f"Bearer {ops.token}"}

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://mgmt") as c:
            assert (await c.get("/api/pid", headers=token)).json() == {"pid": os.getpid()}
            assert (await c.get("/api/pid")).status_code == 401
            r = await c.get("/api/boom", headers=token)
            assert r.status_code == 500
            assert "RuntimeError" in r.json()["error"] and r.json()["request_id"]
            assert (await c.get("/api/pid", headers=token)).status_code == 200
    asyncio.run(go())


def test_a_killed_replica_is_replaced_and_says_why(api):
    import signal
    client, proxy = api
    assert put(client, "killed", greeter("k", "/killed")).status_code == 202
    converged(client, "killed")
    base = "/api/applications/killed/deployments/Hello/replicas"
    victim = client.get(base).json()["replicas"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced():
        now = client.get(base).json()
        gone = [r for r in now["replaced"] if r["replica_id"] == victim["replica_id"]]
        return gone[0] if gone else None
    entry = wait_for(replaced, 30)
    assert "exit code" in entry["reason"] and entry["time"] > 0
    converged(client, "killed")
    assert httpx.get(proxy + "/killed").text == "k from fleet"
    events = client.get("/api/events").json()["events"]
    assert any(e["kind"] == "replica_died" and e["replica"] == victim["replica_id"]
               for e in events)
