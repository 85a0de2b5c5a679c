"""Small helpers shared by the test modules."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import psutil

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


def http_port(lines: Iterable[str]) -> int:
    """The port a `fleet run` says it serves HTTP on, read from its output lines."""
    seen = []
    for line in lines:
        seen.append(line)
        m = re.search(r"fleet: HTTP on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError("fleet run exited before serving:\n" + "".join(seen))


def stop_family(proc: subprocess.Popen[str]) -> None:
    """SIGTERM a `fleet run` (or a driver script) and check it left no process behind."""
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"left behind: {alive}"
