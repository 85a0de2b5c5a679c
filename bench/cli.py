"""Command line of the benchmark suite: ``python -m bench [options]``."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench import loadgen, results
from bench.models import calibrate_cpu_iterations
from bench.procs import REPO_ROOT, bench_env
from bench.scenarios import SCENARIOS, Context, run_scenario

DEFAULT_SCENARIOS = ["http", "grpc", "grpcnoop", "protocols", "handle", "batch", "mlp",
                     "scaling", "multiproxy", "coldstart"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _probe(code: str) -> str | None:
    """Run ``code`` in a fresh interpreter; None when it succeeds, else the last error line."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=bench_env(),
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def system_availability(systems: list[str]) -> dict[str, str | None]:
    """Per system: None when it can run, else ``"<status>: <reason>"`` for its rows."""
    out: dict[str, str | None] = {}
    for system in systems:
        if system == "fleet":
            err = _probe("import fleet; fleet.deployment; fleet.start; fleet.run; fleet.shutdown")
            out[system] = f"not available: {err}" if err else None
        elif system == "fleet-ray":
            err = _probe("import ray, fleet; fleet.start")
            out[system] = "not installed: ray is not importable" if err else None
        elif system == "ray":
            err = _probe("import ray.serve")
            out[system] = "not installed: ray[serve] is not importable" if err else None
        else:
            missing = [m for m in ("uvicorn", "uvloop", "httptools", "grpc")
                       if importlib.util.find_spec(m) is None]
            out[system] = f"not installed: missing {', '.join(missing)}" if missing else None
    return out


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _loadavg() -> str:
    """1, 5 and 15 minute load averages: other work on the machine skews the figures."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _background_cpu(wait_s: float) -> float:
    """Machine-wide CPU use (%) over one second while none of our servers run; with
    ``wait_s`` > 0, wait up to that long for it to drop under 10%."""
    deadline = time.monotonic() + wait_s
    while True:
        busy = psutil.cpu_percent(interval=1.0)
        if busy < 10 or time.monotonic() >= deadline:
            return busy
        _log(f"  machine busy ({busy:.0f}% CPU), waiting")
        time.sleep(4)


def _load_generator(use_wrk: bool) -> str:
    wrk = loadgen.wrk_path() if use_wrk else None
    if wrk:
        proc = subprocess.run([wrk, "-v"], capture_output=True, text=True)
        version = (proc.stdout or proc.stderr).strip().splitlines()[:1]
        http = f"wrk ({version[0] if version else wrk})"
    else:
        http = "built-in asyncio HTTP/1.1 keep-alive client (wrk not used)"
    return f"HTTP: {http}; gRPC: grpc.aio client; handles: asyncio in the driver"


def build_parser() -> argparse.ArgumentParser:
    """Options of ``python -m bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark fleet against Ray Serve and a no-framework baseline.",
    )
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                        help=f"comma-separated subset of {','.join(DEFAULT_SCENARIOS)}")
    parser.add_argument("--systems", default=",".join(results.SYSTEMS),
                        help="comma-separated subset of fleet,ray,baseline")
    parser.add_argument("--quick", action="store_true",
                        help="short runs (2 s, 1 s warm-up, 1 run) unless given explicitly")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (10)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds (3)")
    parser.add_argument("--runs", type=int, default=None, help="measured runs (3)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each system's run, wait up to SECONDS for other "
                             "processes to use under 10%% of the CPU")
    parser.add_argument("--no-wrk", action="store_true", help="use the built-in HTTP client")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results",
                        help="folder for results.json and results.md")
    return parser


def _split(value: str, allowed: list[str] | tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios for the selected systems and write the reports."""
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server's process tree is still stopped.
    signal.signal(signal.SIGTERM, _terminate)
    scenarios = _split(args.scenarios, list(SCENARIOS), "scenario")
    systems = _split(args.systems, results.SYSTEMS, "system")
    quick = args.quick
    ctx = Context(
        duration_s=args.duration if args.duration is not None else (2.0 if quick else 10.0),
        warmup_s=args.warmup if args.warmup is not None else (1.0 if quick else 3.0),
        runs=args.runs if args.runs is not None else (1 if quick else 3),
        use_wrk=not args.no_wrk,
        log=_log,
    )
    ctx.cpu_iters = calibrate_cpu_iterations()
    available = system_availability(systems)
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_generator": _load_generator(ctx.use_wrk),
        "duration_s": ctx.duration_s,
        "warmup_s": ctx.warmup_s,
        "runs": ctx.runs,
        "cpu_loop_iterations": ctx.cpu_iters,
        "machine": f"{_cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} "
                   f"{platform.release()}, Python {platform.python_version()}",
        "versions": ", ".join(f"{d} {_version(d)}" for d in
                              ("fleet", "ray", "uvicorn", "grpcio", "starlette")),
        "availability": {s: (a or "ok") for s, a in available.items()},
        "load_average_at_start": _loadavg(),
    }
    _log(f"load generator: {meta['load_generator']}")
    for system, state in available.items():
        _log(f"{system}: {state or 'ok'}")
    rows: list[results.Row] = []
    for name in scenarios:
        for system in systems:
            background = None if available[system] else _background_cpu(args.wait_idle)
            _log(f"[{name}] {system} ... (background CPU {background or 0:.0f}%)")
            t0 = time.monotonic()
            new = run_scenario(ctx, name, system, available[system])
            for row in new:
                row.background_cpu_pct = background
            rows.extend(new)
            summary = "; ".join(
                f"{r.metric}={r.value:.4g}" if r.value is not None else f"{r.metric}={r.status}"
                for r in new
            )
            _log(f"[{name}] {system} done in {time.monotonic() - t0:.1f}s: {summary}")
            # Partial results survive an interrupted or crashed run.
            results.write(rows, meta, args.out)
    meta["load_average_at_end"] = _loadavg()
    json_path, md_path = results.write(rows, meta, args.out)
    print(md_path.read_text())
    _log(f"wrote {json_path} and {md_path}")
    return 0
