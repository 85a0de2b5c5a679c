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
                  "test_testing.py", "test_config.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.path)
        if (path.startswith(MEMORY_DIR + os.sep) or item.path.name in MEMORY_MODULES
                or {"memory_instance", "shared_memory_instance"}
                & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.memory)


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


def start_instance(**http_options: Any) -> Instance:
    opts = {"host": "127.0.0.1", "port": 0}
    opts.update(http_options)
    fleet.start(http_options=opts)
    port = fleet.status()["proxies"]["http"]["port"]
    return Instance(http_port=port)


@pytest.fixture
def instance() -> Iterator[Instance]:
    """A fresh instance per test; every process it started is gone afterwards."""
    fleet.shutdown()
    inst = start_instance()
    try:
        yield inst
    finally:
        fleet.shutdown()


@pytest.fixture(scope="module")
def shared_instance() -> Iterator[Instance]:
    """One instance for a whole test module (tests deploy under their own app names)."""
    fleet.shutdown()
    inst = start_instance()
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
