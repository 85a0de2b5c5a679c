"""Smoke test of the benchmark harness: fleet only, http, protocols, handle and metrics
(on and off), about a minute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_bench_quick_fleet_http_protocols_and_handle(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--systems", "fleet",
            "--scenarios", "http,protocols,handle,metrics", "--duration", "1", "--warmup", "0.5",
            "--runs", "1", "--out", str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# fleet benchmark results")
    rates = [
        row for row in data["rows"]
        if row["system"] == "fleet" and row["unit"] in ("req/s", "calls/s")
    ]
    assert {row["scenario"] for row in rates} == {"http", "protocols", "handle", "metrics"}
    for row in rates:
        assert row["status"] == "ok", row
        assert row["value"] > 0, row
