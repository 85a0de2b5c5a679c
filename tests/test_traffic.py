"""Traffic policies on the memory backend, HTTP through the proxy's app: weighted splits
changed live under load, shadow copies whose failures never reach the client,
validation, status and YAML. The example script runs them for real."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import yaml

import fleet
from fleet._api import _apply_traffic
from fleet._config import FleetConfig


@fleet.deployment(num_replicas=1)
class Version:
    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, request=None) -> str:
        return self.name

    async def letters(self):
        for letter in self.name:
            yield letter


@fleet.deployment
class Shadow:
    """Counts the copies it gets, and fails every one of them."""

    def __init__(self) -> None:
        self.hits = 0

    async def __call__(self, request=None) -> str:
        if request is not None:
            self.hits += 1
            raise RuntimeError("the shadow is broken")
        return "direct"

    async def count(self) -> int:
        return self.hits


@pytest.fixture(scope="module")
def apps(shared_memory_instance):
    fleet.run(Version.bind("v1"), name="app_v1", route_prefix="/svc")
    fleet.run(Version.bind("v2"), name="app_v2", route_prefix=None)
    shadow = fleet.run(Shadow.bind(), name="app_v3", route_prefix=None)
    with shared_memory_instance.http() as client:
        yield client, shadow
    fleet.set_traffic("/svc", None)


def _hits(client: httpx.Client, n: int) -> list[str]:
    out = []
    for _ in range(n):
        r = client.get("/svc")
        assert r.status_code == 200, r.text
        out.append(r.text)
    return out


def test_weights_split_a_route_across_applications(apps) -> None:
    client, _ = apps
    fleet.set_traffic("/svc", {"app_v1": 0.7, "app_v2": 0.3})
    got = _hits(client, 300)
    share = got.count("v2") / len(got)
    assert set(got) == {"v1", "v2"}
    assert 0.15 < share < 0.45
    assert fleet.status()["traffic"]["/svc"]["weights"] == {"app_v1": 0.7, "app_v2": 0.3}


def _wait_for_more(results: list, n: int, timeout_s: float = 20.0) -> None:
    mark, deadline = len(results), time.monotonic() + timeout_s
    while len(results) < mark + n:
        assert time.monotonic() < deadline, "the load stopped"
        time.sleep(0.01)


def test_weights_change_live_under_load_without_failed_requests(
        apps, shared_memory_instance) -> None:
    stop = threading.Event()
    results: list[str] = []
    errors: list[str] = []

    def load() -> None:
        with shared_memory_instance.http() as c:
            while not stop.is_set():
                r = c.get("/svc")
                (results if r.status_code == 200 else errors).append(r.text)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for weights in ({"app_v1": 1}, {"app_v1": 1, "app_v2": 1}, {"app_v2": 1},
                        {"app_v1": 0, "app_v2": 5}):
            fleet.set_traffic("/svc", weights)
            _wait_for_more(results, 30)     # let the load run under this policy
        _wait_for_more(results, 30)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    assert set(results[-30:]) == {"v2"}     # set_traffic is live when it returns


def test_invalid_weights_are_refused(apps) -> None:
    fleet.set_traffic("/svc", None)
    with pytest.raises(ValueError, match="non-negative"):
        fleet.set_traffic("/svc", {"app_v1": -1})
    with pytest.raises(ValueError, match="all be zero"):
        fleet.set_traffic("/svc", {"app_v1": 0, "app_v2": 0})
    with pytest.raises(ValueError, match="not running"):
        fleet.set_traffic("/svc", {"app_nope": 1})
    with pytest.raises(ValueError, match="no application serves"):
        fleet.set_traffic("/elsewhere", {"app_v1": 1})
    with pytest.raises(ValueError, match="from 0 to 1"):
        fleet.shadow_traffic("/svc", "app_v3", 1.5)
    assert fleet.status()["traffic"] == {}      # a refused policy changes nothing


def test_shadow_copies_a_fraction_and_its_failures_never_reach_clients(apps) -> None:
    client, shadow = apps
    fleet.set_traffic("/svc", {"app_v1": 1})
    before = shadow.count.remote().result()
    fleet.shadow_traffic("/svc", "app_v3", 0.5)
    assert fleet.status()["traffic"]["/svc"]["shadow"] == {"app_v3": 0.5}
    got = _hits(client, 200)
    assert set(got) == {"v1"}       # only the primary's answers, all 200 (checked in _hits)
    deadline = time.monotonic() + 10
    copies = 0
    while time.monotonic() < deadline:
        copies = shadow.count.remote().result() - before
        if copies >= 60:
            break
        time.sleep(0.05)
    assert 60 <= copies <= 140
    fleet.shadow_traffic("/svc", "app_v3", 0)
    assert "shadow" not in fleet.status()["traffic"].get("/svc", {}) or \
        fleet.status()["traffic"]["/svc"]["shadow"] == {}


def test_app_handles_follow_the_split_as_http_does(apps) -> None:
    client, _ = apps
    fleet.set_traffic("/svc", {"app_v2": 1})
    try:
        from_run = fleet.run(Version.bind("v1"), name="app_v1", route_prefix="/svc")
        by_name = fleet.get_app_handle("app_v1")
        assert set(_hits(client, 20)) == {"v2"}
        assert {by_name.remote().result() for _ in range(20)} == {"v2"}
        assert {from_run.remote().result() for _ in range(20)} == {"v2"}
        streamed = by_name.options(stream=True).letters
        assert {"".join(streamed.remote()) for _ in range(10)} == {"v2"}
        # A handle to one deployment (as deployments hold to each other) is not routed.
        inner = fleet.get_deployment_handle("Version", "app_v1")
        assert {inner.remote().result() for _ in range(20)} == {"v1"}
    finally:
        fleet.set_traffic("/svc", None)
    assert {by_name.remote().result() for _ in range(5)} == {"v1"}


def test_app_handles_copy_calls_to_shadows(apps) -> None:
    _, shadow = apps
    before = shadow.count.remote().result()
    fleet.shadow_traffic("/svc", "app_v3", 1.0)      # every call is copied
    try:
        handle = fleet.get_app_handle("app_v1")
        got = [handle.remote("a request").result() for _ in range(20)]
        assert set(got) == {"v1"}           # the shadow's failures never reach the caller
        deadline = time.monotonic() + 10
        while shadow.count.remote().result() - before < 20:
            assert time.monotonic() < deadline, "the shadow copies did not arrive"
            time.sleep(0.02)
    finally:
        fleet.shadow_traffic("/svc", "app_v3", 0)
    assert shadow.count.remote().result() - before == 20


def test_traffic_from_yaml_config(apps) -> None:
    text = """
traffic:
  - route_prefix: /svc
    weights: {app_v1: 1, app_v2: 3}
    shadow: {app_v3: 0.1}
"""
    cfg = FleetConfig(**yaml.safe_load(text))
    _apply_traffic(cfg.traffic)
    policy = fleet.status()["traffic"]["/svc"]
    assert policy == {"weights": {"app_v1": 1.0, "app_v2": 3.0}, "shadow": {"app_v3": 0.1}}
    fleet.shadow_traffic("/svc", "app_v3", 0)


def test_serving_traffic_example_runs() -> None:
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "serving_traffic.py")],
                         capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "hello from v1" in out.stdout
