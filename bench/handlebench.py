"""Measure Python handle calls from inside a driver process.

Each system's driver (fleet, Ray Serve, baseline) hands this module two callables:
an async one (``await handle.remote()``) and a blocking one
(``handle.remote().result()``).  Results are printed as ``RESULT <json>`` lines that
the harness collects; CPU is the driver's own process tree, which includes the
replicas, the controller and the calling code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.loadgen import percentile
from bench.procs import tree_cpu_seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that select and size the handle benchmark in a driver."""
    parser.add_argument("--handle-bench", action="store_true", help="run the handle benchmark")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=200)


async def _throughput(
    call: Callable[[], Awaitable[Any]], concurrency: int, duration_s: float
) -> tuple[int, int, float]:
    """Keep ``concurrency`` calls in flight for ``duration_s``; (ok, errors, seconds)."""
    ok = errors = 0
    start = time.perf_counter()
    stop_at = start + duration_s

    async def worker() -> None:
        nonlocal ok, errors
        while time.perf_counter() < stop_at:
            try:
                await call()
                ok += 1
            except Exception:
                errors += 1
                await asyncio.sleep(0.001)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, errors, time.perf_counter() - start


def _latency(call: Callable[[], Any], duration_s: float, max_calls: int = 20_000) -> list[float]:
    """Time blocking calls one at a time for ``duration_s``."""
    samples: list[float] = []
    stop_at = time.perf_counter() + duration_s
    while time.perf_counter() < stop_at and len(samples) < max_calls:
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return samples


def run(
    args: argparse.Namespace,
    async_call: Callable[[], Awaitable[Any]],
    sync_call: Callable[[], Any],
    run_async: Callable[[Awaitable[Any]], Any] = asyncio.run,
) -> None:
    """Warm up, then print one RESULT line per measured run."""
    me = os.getpid()
    run_async(_throughput(async_call, min(args.concurrency, 50), args.warmup))
    _latency(sync_call, min(args.warmup, 0.5))
    for index in range(args.runs):
        cpu0 = tree_cpu_seconds(me)
        ok, errors, elapsed = run_async(_throughput(async_call, args.concurrency, args.duration))
        cpu = tree_cpu_seconds(me) - cpu0
        lat = _latency(sync_call, args.duration)
        record = {
            "run": index,
            "calls": ok,
            "errors": errors,
            "seconds": elapsed,
            "calls_per_s": ok / elapsed if elapsed else 0.0,
            "cpu_us_per_call": cpu / ok * 1e6 if ok else None,
            "p50_s": percentile(lat, 50) if lat else None,
            "p99_s": percentile(lat, 99) if lat else None,
            "latency_samples": len(lat),
        }
        print("RESULT " + json.dumps(record), flush=True)


def server_setup(description: str | None,
                 argv: list[str] | None) -> tuple[Any, threading.Event, threading.Event]:
    """The common start of a benchmark server process: its arguments, and (stop,
    serving) events wired to SIGTERM/SIGINT. A signal before ``serving`` is set exits at
    once; after it, it sets ``stop``."""

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--app", default="noop")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--num-proxies", type=int, default=1)
    parser.add_argument("--backend", default="local", choices=["local", "ray"])
    add_arguments(parser)
    args = parser.parse_args(argv)
    stop = threading.Event()
    serving = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if not serving.is_set():  # still starting: give up right away
            raise SystemExit(128 + signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return args, stop, serving
