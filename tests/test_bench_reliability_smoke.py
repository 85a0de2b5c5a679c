"""Smoke test of ``python -m bench.reliability``: the kill scenario, quick."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_reliability_kill_scenario_runs_and_nothing_hangs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.reliability", "--quick", "--scenarios", "kill",
         "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kill = json.loads((tmp_path / "reliability.json").read_text())["kill"]
    assert kill["requests"] == 600
    assert kill["hung"] == 0
    # only calls in flight on the killed replica may fail (100 req/s, 10 ms each)
    assert kill["failed"] <= 5
    assert kill["replacement_serves_after_s"] is not None
