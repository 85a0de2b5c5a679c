"""Shared fixtures: a running fleet instance with HTTP on a free loopback port."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# This test session keeps its instances' records in a temporary directory of its own, so
# another session on the machine (a second suite, a developer's `fleet run`) never
# attaches to them, nor they to it. Set before fleet is imported, and removed last.
_SESSION_TMP = tempfile.mkdtemp(prefix="fleet-tests-")
tempfile.tempdir = _SESSION_TMP
os.environ["TMPDIR"] = _SESSION_TMP
os.environ.pop("XDG_RUNTIME_DIR", None)
# Log files (fleet/_logs.py) of every instance the tests start stay in it too.
os.environ["XDG_STATE_HOME"] = os.path.join(_SESSION_TMP, "state")
os.environ.pop("FLEET_LOGS_DIR", None)
# Ray reads it when imported: every node of the tests' Ray cluster stays on 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)

import fleet  # noqa: E402

# Test modules define deployments at module level; replicas import them by name.
sys.path.insert(0, os.path.dirname(__file__))
from helpers import MemoryInstance  # noqa: E402

# Every test below hands the processes it starts a temporary directory of their own.


# The in-memory layer (`python -m pytest -m memory`, seconds): everything under
# tests/memory, these modules, which start no process and open no socket, and every test
# on the `memory_instance` or `shared_memory_instance` fixtures (replicas as tasks of this
# process: no process starts).
MEMORY_DIR = os.path.join(os.path.dirname(__file__), "memory")
MEMORY_MODULES = {"test_layers.py", "test_proxy_traffic.py", "test_router.py",
                  "test_testing.py", "test_config.py", "test_history.py"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_backends`` run on the local backend and on Ray, through the
    instance and shared_instance fixtures."""
    if metafunc.definition.get_closest_marker("both_backends") is None:
        return
    if not {"instance", "shared_instance"} & set(metafunc.fixturenames):
        return
    metafunc.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)],
                         indirect=True, scope="module")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.path)
        if (path.startswith(MEMORY_DIR + os.sep) or item.path.name in MEMORY_MODULES
                or {"memory_instance", "shared_memory_instance"}
                & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.memory)
    # The Ray tests last: their cluster lives until the session ends, and the tests that
    # count this process's children or memory must not see its processes.
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)


@pytest.fixture(autouse=True)
def own_runtime_location(tmp_path_factory: pytest.TempPathFactory,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes a test starts (a `fleet run`, a script) find the instances of that
    test's other processes and never this process's: a script's fleet.start() would
    otherwise attach to the instance of the running test, and its fleet.shutdown() stop
    it."""
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("run")))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)


@dataclass
class Instance:
    """What a test needs to reach the running instance."""

    http_port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def start_instance(start: dict[str, Any] | None = None, **http_options: Any) -> Instance:
    opts = {"host": "127.0.0.1", "port": 0}
    opts.update(http_options)
    fleet.start(http_options=opts, **(start or {}))
    port = fleet.status()["proxies"]["http"]["port"]
    return Instance(http_port=port)


# The Ray cluster the Ray backend's tests run on: two nodes on this machine, each with a
# custom resource of its own so tests can force where a replica goes, four logical CPUs
# (replicas ask for one each by default) and a small object store (fleet puts nothing
# in it). Started once per session, on first use, and always shut down.
RAY_NODE = {"num_cpus": 4, "object_store_memory": 80 * 1024 * 1024}
RAY_SKIP = "Ray is not installed: pip install 'fleet[ray]' to run the Ray backend's tests"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A real multi-node Ray cluster (ray.cluster_utils.Cluster), this process its driver."""
    ray = pytest.importorskip("ray", reason=RAY_SKIP)
    from ray.cluster_utils import Cluster
    cluster = Cluster()
    # Ray's session directory holds Unix sockets: the test's deep TMPDIR is too long
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    try:
        cluster.add_node(**RAY_NODE, resources={"head": 1})
        cluster.add_node(**RAY_NODE, resources={"worker": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="fleet", logging_level="WARNING")
        yield cluster
    finally:
        fleet.shutdown()
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_TMPDIR", None)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """The backend the instance fixtures start: "local" unless a test is marked
    both_backends (then "local" and "ray" in turn)."""
    return str(getattr(request, "param", "local"))


def _start_on(backend: str, request: pytest.FixtureRequest) -> Instance:
    if backend == "ray":
        cluster = request.getfixturevalue("ray_cluster")
        return start_instance({"backend": "ray", "ray_address": cluster.address})
    return start_instance()


@pytest.fixture
def instance(backend: str, request: pytest.FixtureRequest) -> Iterator[Instance]:
    """A fresh instance per test; every process it started is gone afterwards."""
    fleet.shutdown()
    inst = _start_on(backend, request)
    try:
        yield inst
    finally:
        fleet.shutdown()


@pytest.fixture(scope="module")
def shared_instance(backend: str, request: pytest.FixtureRequest) -> Iterator[Instance]:
    """One instance for a whole test module (tests deploy under their own app names)."""
    fleet.shutdown()
    inst = _start_on(backend, request)
    try:
        yield inst
    finally:
        fleet.shutdown()


@pytest.fixture
def memory_instance() -> Iterator[MemoryInstance]:
    """A fresh instance on the memory backend (no process starts): fleet.run, handles,
    fleet.status and fleet.delete reach it as they reach a real one; `.http()` is an
    HTTP client for the proxy's app."""
    fleet.shutdown()
    mem = MemoryInstance().start()
    try:
        yield mem
    finally:
        mem.shutdown()


@pytest.fixture(scope="module")
def shared_memory_instance() -> Iterator[MemoryInstance]:
    """One memory-backend instance for a whole test module."""
    fleet.shutdown()
    mem = MemoryInstance().start()
    try:
        yield mem
    finally:
        mem.shutdown()
