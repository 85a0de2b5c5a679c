"""Shared fixtures: a running fleet instance with HTTP on a free loopback port."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import fleet

# Test modules define deployments at module level; replicas import them by name.
sys.path.insert(0, os.path.dirname(__file__))


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
