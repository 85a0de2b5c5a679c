"""Smoke test of the benchmark harness: fleet only, http, protocols, handle and metrics
(on and off), about a minute."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
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


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_bench_quick_fleet_on_ray_http_and_handle(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'fleet[ray]'")
    # the bench's private Ray keeps Unix sockets in its session directory: a short path
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    try:
        proc = _quick_fleet_on_ray(tmp_path)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    rates = {row["scenario"]: row for row in rows if row["unit"] in ("req/s", "calls/s")}
    for scenario in ("http", "handle"):
        assert rates[scenario]["status"] == "ok" and rates[scenario]["value"] > 0, rows
    assert rates["grpc"]["status"] == "skipped"
    assert "fleet on Ray" in (tmp_path / "results.md").read_text()


def _quick_fleet_on_ray(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--systems", "fleet-ray",
            "--scenarios", "http,handle,grpc", "--duration", "1", "--warmup", "0.5",
            "--runs", "1", "--out", str(tmp_path),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=280,
    )
