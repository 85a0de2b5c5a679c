"""The backend seam: the controller makes and watches replicas only through the
``fleet._types.Backend`` interface, so another backend (Ray) can stand in."""

from __future__ import annotations

import inspect
import os
import pathlib
import re
import signal
import time
from typing import Any

import fleet
from fleet import _api
from fleet._types import Backend

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEAM = {name for name, _ in inspect.getmembers(Backend) if not name.startswith("_")}


@fleet.deployment(num_replicas=2, health_check_period_s=0.2)
class Pid:
    def __call__(self) -> int:
        return os.getpid()


class OnlyTheSeam:
    """A backend offering nothing but the Protocol's names, delegating to the real one."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.used: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        assert name in SEAM, f"the controller used backend.{name}, which is not in the seam"
        self.used.add(name)
        return getattr(self._real, name)


def test_controller_uses_only_the_backend_protocol_in_its_source() -> None:
    used = set()
    for path in (ROOT / "fleet" / "_controller").glob("*.py"):
        used |= set(re.findall(r"\bbackend\.(\w+)", path.read_text()))
    assert used and used <= SEAM, used - SEAM
    importers = [p for p in (ROOT / "fleet").rglob("*.py")
                 if "LocalBackend" in p.read_text() and p.parent.name != "_backends"]
    assert [p.name for p in importers] == ["_api.py"]   # the Instance picks the backend


def test_replicas_start_die_get_replaced_and_stop_through_the_seam(instance) -> None:
    controller = _api._instance.controller
    seam = OnlyTheSeam(controller.backend)
    controller.backend = seam
    try:
        handle = fleet.run(Pid.bind(), name="seam", route_prefix=None)
        reps = fleet.status()["applications"]["seam"]["deployments"]["Pid"]["replicas"]
        pids = {r["pid"] for r in reps}
        assert len(pids) == 2 and handle.remote().result() in pids
        victim = pids.pop()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            reps = fleet.status()["applications"]["seam"]["deployments"]["Pid"]["replicas"]
            running = {r["pid"] for r in reps if r["state"] == "RUNNING"}
            if len(running) == 2 and victim not in running:
                break
            assert time.monotonic() < deadline, reps
            time.sleep(0.02)
        fleet.delete("seam")
        assert {"start_replica", "stop_replica", "alive", "kill"} <= seam.used
    finally:
        controller.backend = seam._real
