"""Small helpers shared by the test modules."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import fleet

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout_s: float = 15.0) -> T:
    """Poll state that fleet changes in other processes until cond() is truthy; fail
    after timeout_s. Returns the truthy value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def replicas(app: str, deployment: str) -> list[dict[str, Any]]:
    """The replicas fleet.status() shows for one deployment."""
    return list(fleet.status()["applications"][app]["deployments"][deployment]["replicas"])
