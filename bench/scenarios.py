"""The benchmark scenarios, each run against fleet, Ray Serve and the baseline.

A scenario function gets a :class:`Context` and a system name and returns, for each
of its metrics, the list of per-run values (and an optional note).  It starts every
server in its own subprocess through :class:`bench.procs.ServerProcess`, which stops
the whole process tree when the scenario ends or fails.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import loadgen, models
from bench.models import CPU_ITERS_ENV
from bench.procs import (
    REPO_ROOT,
    ServerProcess,
    bench_env,
    cpu_window,
    free_port,
    kill_tree,
    python_module,
    tree_memory,
)
from bench.results import Metric, Row

Measured = dict[str, tuple[list[float], str]]
SERVE_MODULE = {
    "fleet": "bench._serve_fleet",
    "fleet-ray": "bench._serve_fleet",      # with --backend ray
    "ray": "bench._serve_ray",
    "baseline": "bench._serve_baseline",
}


class Unavailable(Exception):
    """A system cannot run this scenario; ``status`` goes into the report row."""

    def __init__(self, status: str, note: str) -> None:
        super().__init__(note)
        self.status = status
        self.note = note


@dataclass
class Context:
    """Settings shared by every scenario."""

    duration_s: float = 10.0
    warmup_s: float = 3.0
    runs: int = 3
    use_wrk: bool = True
    cpu_iters: int = 60_000
    log: Callable[[str], None] = print
    http_conns: int = 32
    handle_concurrency: int = 200
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Environment for server subprocesses."""
        return bench_env({CPU_ITERS_ENV: str(self.cpu_iters), **self.extra_env})


def _app_args(system: str, app: str) -> list[str]:
    """Per-system command-line arguments selecting app ``app``."""
    if system == "fleet-ray":
        return ["--app", app, "--backend", "ray"]
    if system != "baseline":
        return ["--app", app]
    if app in ("cpu1", "cpu2"):
        return ["--app", "cpu", "--workers", app[-1]]
    if app == "predict_grpc":
        return ["--app", "predict"]
    return [] if app == "grpc_app" else ["--app", app]


def start_server(ctx: Context, system: str, app: str, *extra: str, grpc: bool = False,
                 timeout_s: float = 240.0) -> ServerProcess:
    """Launch ``app`` on ``system`` in a subprocess and wait until it is ready."""
    port = free_port()
    args = ["--port", str(port), *_app_args(system, app), *extra]
    if grpc:
        args += ["--grpc-port", str(free_port())]
    server = ServerProcess(python_module(SERVE_MODULE[system], *args), env=ctx.env(),
                           ready_timeout_s=timeout_s)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as exc:
        server.stop()
        text = str(exc)
        if "UNAVAILABLE" in text:
            reason = text.split("UNAVAILABLE", 1)[1].strip().splitlines()[0]
            raise Unavailable("skipped", reason) from None
        raise
    server.info.setdefault("port", port)
    return server


def _per_request_us(cpu_s: float, requests: int) -> float:
    return cpu_s / requests * 1e6 if requests else math.nan


def _http_runs(ctx: Context, server: ServerProcess, conns: int,
               roles: dict[str, list[float]] | None = None
               ) -> tuple[list[float], list[float], int]:
    """Warm up, then measure (requests/s, CPU µs/request) per run; also total errors.
    roles, when given, gets each run's CPU µs/request per process kind (driver, proxy,
    replica)."""
    port = int(server.info["port"])
    loadgen.wait_http_ok(port)
    loadgen.http_load(port, "/", conns, ctx.warmup_s, ctx.use_wrk)
    rps: list[float] = []
    cpu: list[float] = []
    errors = 0
    for _ in range(ctx.runs):
        with cpu_window(server.pid) as window:
            res = loadgen.http_load(port, "/", conns, ctx.duration_s, ctx.use_wrk)
        rps.append(res.rps)
        cpu.append(_per_request_us(window["cpu_s"], res.requests))
        errors += res.errors
        if roles is not None:
            for role in ("driver", "proxy", "replica"):
                roles.setdefault(role, []).append(
                    _per_request_us(window[f"cpu_{role}_s"], res.requests))
    return rps, cpu, errors


def _latency_runs(ctx: Context, port: int) -> tuple[list[float], list[float]]:
    """p50 and p99 (ms) with one connection, per run."""
    p50: list[float] = []
    p99: list[float] = []
    for _ in range(ctx.runs):
        res = loadgen.http_load(port, "/", 1, ctx.duration_s, ctx.use_wrk)
        for out, q in ((p50, 50.0), (p99, 99.0)):
            value = res.percentile(q)
            out.append(value * 1e3 if value is not None else math.nan)
    return p50, p99


def _error_note(errors: int) -> str:
    return f"{errors} failed requests" if errors else ""


HTTP_METRICS = [
    Metric("requests/s, 32 connections", "req/s"),
    Metric("CPU per request, 32 connections", "µs", "lower"),
    Metric("p50 latency, 1 connection", "ms", "lower"),
    Metric("p99 latency, 1 connection", "ms", "lower"),
    # fleet's processes apart, so the next bottleneck shows in the table
    Metric("CPU per request in the proxy, 32 connections", "µs", "lower"),
    Metric("CPU per request in the replica, 32 connections", "µs", "lower"),
    Metric("CPU per request in the driver, 32 connections", "µs", "lower"),
]


def scenario_http(ctx: Context, system: str) -> Measured:
    """HTTP no-op: throughput with 32 connections, latency with one."""
    roles: dict[str, list[float]] = {}
    with start_server(ctx, system, "noop") as server:
        rps, cpu, errors = _http_runs(ctx, server, ctx.http_conns, roles)
        p50, p99 = _latency_runs(ctx, int(server.info["port"]))
    names = [m.name for m in HTTP_METRICS]
    out: Measured = dict(zip(names[:4], [(rps, _error_note(errors)), (cpu, ""), (p50, ""),
                                         (p99, "")], strict=True))
    if system == "fleet":
        for name, role in zip(names[4:], ("proxy", "replica", "driver"), strict=True):
            out[name] = (roles[role], "")
    else:
        for name in names[4:]:
            out[name] = ([], "n/a: fleet's processes only")
    return out


GRPC_METRICS = [
    Metric("requests/s, 32 concurrent calls", "req/s"),
    Metric("CPU per request, 32 concurrent calls", "µs", "lower"),
    Metric("p50 latency, 1 call at a time", "ms", "lower"),
    Metric("p99 latency, 1 call at a time", "ms", "lower"),
]


def _grpc_runs(ctx: Context, system: str, app: str) -> Measured:
    """Throughput and CPU with 32 concurrent calls, latency with one, of app's Predict."""
    with start_server(ctx, system, app, grpc=True) as server:
        info = server.info
        port = int(info["grpc_port"])
        method = str(info["grpc_method"])
        payload = bytes.fromhex(info["grpc_request_hex"])
        metadata = [tuple(m) for m in info.get("grpc_metadata", [])]
        probe = loadgen.grpc_load(port, method, payload, metadata, 1, 0.2)
        if not probe.requests:
            raise RuntimeError(f"no successful Predict call ({probe.first_error})")
        loadgen.grpc_load(port, method, payload, metadata, 32, ctx.warmup_s)
        rps, cpu, p50, p99 = [], [], [], []
        errors = 0
        for _ in range(ctx.runs):
            with cpu_window(server.pid) as window:
                res = loadgen.grpc_load(port, method, payload, metadata, 32, ctx.duration_s)
            rps.append(res.rps)
            cpu.append(_per_request_us(window["cpu_s"], res.requests))
            errors += res.errors
        for _ in range(ctx.runs):
            res = loadgen.grpc_load(port, method, payload, metadata, 1, ctx.duration_s)
            p50.append(loadgen.percentile(res.latencies_s, 50) * 1e3)
            p99.append(loadgen.percentile(res.latencies_s, 99) * 1e3)
    names = [m.name for m in GRPC_METRICS]
    values = [(rps, _error_note(errors)), (cpu, ""), (p50, ""), (p99, "")]
    return dict(zip(names, values, strict=True))


def scenario_grpc(ctx: Context, system: str) -> Measured:
    """gRPC FruitMarket graph (driver -> market -> stand) through each gRPC front end."""
    return _grpc_runs(ctx, system, "grpc_app")


def scenario_grpcnoop(ctx: Context, system: str) -> Measured:
    """gRPC like for like: Predict answered by one deployment (a plain grpc.aio
    servicer for the baseline), the handler of the protocols scenario."""
    if system == "ray":
        raise Unavailable("skipped", "no Ray Serve counterpart in this harness")
    return _grpc_runs(ctx, system, "predict_grpc")


PROTOCOL_METRICS = [
    Metric("HTTP/JSON requests/s, 32 connections", "req/s"),
    Metric("HTTP/JSON CPU per request, 32 connections", "µs", "lower"),
    Metric("HTTP/JSON p50 latency, 1 connection", "ms", "lower"),
    Metric("gRPC Predict requests/s, 32 concurrent calls", "req/s"),
    Metric("gRPC Predict CPU per request, 32 concurrent calls", "µs", "lower"),
    Metric("gRPC Predict p50 latency, 1 call at a time", "ms", "lower"),
]


def scenario_protocols(ctx: Context, system: str) -> Measured:
    """The same handler behind one deployment, over HTTP/JSON and over gRPC Predict, from
    the same server process: a like-for-like check of "gRPC is faster than HTTP"."""
    if system != "fleet":
        raise Unavailable("skipped", "fleet's own HTTP/JSON against gRPC comparison")
    with start_server(ctx, system, "predict_http", grpc=True) as server:
        info = server.info
        port, grpc_port = int(info["port"]), int(info["grpc_port"])
        body = json.dumps({"input": models.PREDICT_INPUT}).encode()
        method = str(info["grpc_method"])
        payload = bytes.fromhex(info["grpc_request_hex"])
        metadata = [tuple(m) for m in info.get("grpc_metadata", [])]
        probe = loadgen.grpc_load(grpc_port, method, payload, metadata, 1, 0.2)
        if not probe.requests:
            raise RuntimeError(f"no successful Predict call ({probe.first_error})")
        out: dict[str, list[float]] = {m.name: [] for m in PROTOCOL_METRICS}
        errors = 0
        loadgen.http_load(port, "/", ctx.http_conns, ctx.warmup_s, json_body=body)
        loadgen.grpc_load(grpc_port, method, payload, metadata, 32, ctx.warmup_s)
        for _ in range(ctx.runs):     # the two protocols alternate, so drift hits both
            with cpu_window(server.pid) as window:
                res = loadgen.http_load(port, "/", ctx.http_conns, ctx.duration_s,
                                        json_body=body)
            out[PROTOCOL_METRICS[0].name].append(res.rps)
            out[PROTOCOL_METRICS[1].name].append(_per_request_us(window["cpu_s"],
                                                                 res.requests))
            errors += res.errors
            with cpu_window(server.pid) as window:
                g = loadgen.grpc_load(grpc_port, method, payload, metadata, 32,
                                      ctx.duration_s)
            out[PROTOCOL_METRICS[3].name].append(g.rps)
            out[PROTOCOL_METRICS[4].name].append(_per_request_us(window["cpu_s"],
                                                                 g.requests))
            errors += g.errors
            one = loadgen.http_load(port, "/", 1, ctx.duration_s, json_body=body)
            out[PROTOCOL_METRICS[2].name].append((one.percentile(50.0) or math.nan) * 1e3)
            g1 = loadgen.grpc_load(grpc_port, method, payload, metadata, 1, ctx.duration_s)
            out[PROTOCOL_METRICS[5].name].append(loadgen.percentile(g1.latencies_s, 50) * 1e3)
    note = _error_note(errors)
    return {name: (values, note if i == 0 else "")
            for i, (name, values) in enumerate(out.items())}


HANDLE_METRICS = [
    Metric("calls/s, 200 in flight", "calls/s"),
    Metric("CPU per call, 200 in flight", "µs", "lower"),
    Metric("p50 latency, 1 call at a time", "ms", "lower"),
    Metric("p99 latency, 1 call at a time", "ms", "lower"),
]


def scenario_handle(ctx: Context, system: str) -> Measured:
    """Python handle calls from a driver to a no-op deployment (driver CPU included)."""
    extra = [
        "--handle-bench", "--duration", str(ctx.duration_s), "--warmup", str(ctx.warmup_s),
        "--runs", str(ctx.runs), "--concurrency", str(ctx.handle_concurrency),
    ]
    server = start_server(ctx, system, "noop", *extra)
    try:
        budget = ctx.warmup_s * 2 + ctx.runs * (2 * ctx.duration_s + 30) + 60
        if server.wait(budget) is None:
            raise TimeoutError(f"handle benchmark did not finish in {budget:.0f}s")
        results = server.json_lines("RESULT")
        if not results:
            raise RuntimeError(f"handle benchmark printed no result: {server.tail()}")
    finally:
        server.stop()
    errors = sum(int(r["errors"]) for r in results)
    keys = ["calls_per_s", "cpu_us_per_call", "p50_s", "p99_s"]
    scale = [1.0, 1.0, 1e3, 1e3]
    out: Measured = {}
    for metric, key, factor in zip(HANDLE_METRICS, keys, scale, strict=True):
        values = [float(r[key]) * factor for r in results if r.get(key) is not None]
        out[metric.name] = (values, _error_note(errors) if key == "calls_per_s" else "")
    return out


BATCH_METRICS = [
    Metric("requests/s unbatched, 64 connections", "req/s"),
    Metric("requests/s batched, 64 connections", "req/s"),
    Metric("batched / unbatched", "×"),
    Metric("CPU per request batched", "µs", "lower"),
]


def scenario_batch(ctx: Context, system: str) -> Measured:
    """5 ms + 0.1 ms/item model, with and without request batching."""
    return _batched_vs_unbatched(ctx, system, "model")


def scenario_mlp(ctx: Context, system: str) -> Measured:
    """A real network (scikit-learn MLP on the digits data), with and without batching."""
    return _batched_vs_unbatched(ctx, system, "mlp")


def _batched_vs_unbatched(ctx: Context, system: str, model: str) -> Measured:
    with start_server(ctx, system, f"{model}_unbatched") as server:
        plain, _, err_plain = _http_runs(ctx, server, 64)
    try:
        with start_server(ctx, system, f"{model}_batched") as server:
            batched, cpu, err_batched = _http_runs(ctx, server, 64)
    except Unavailable as exc:
        return {
            BATCH_METRICS[0].name: (plain, _error_note(err_plain)),
            BATCH_METRICS[1].name: ([], f"{exc.status}: {exc.note}"),
            BATCH_METRICS[2].name: ([], f"{exc.status}: {exc.note}"),
            BATCH_METRICS[3].name: ([], f"{exc.status}: {exc.note}"),
        }
    speedup = [b / p for b, p in zip(batched, plain, strict=False) if p]
    return {
        BATCH_METRICS[0].name: (plain, _error_note(err_plain)),
        BATCH_METRICS[1].name: (batched, _error_note(err_batched)),
        BATCH_METRICS[2].name: (speedup, ""),
        BATCH_METRICS[3].name: (cpu, ""),
    }


SCALING_METRICS = [
    Metric("requests/s, 1 replica, 8 connections", "req/s"),
    Metric("requests/s, 2 replicas, 8 connections", "req/s"),
    Metric("2 replicas / 1 replica", "×"),
]


def scenario_scaling(ctx: Context, system: str) -> Measured:
    """CPU-bound 5 ms handler: throughput of 2 replicas over 1 (baseline: uvicorn workers)."""
    with start_server(ctx, system, "cpu1") as server:
        one, _, err1 = _http_runs(ctx, server, 8)
    with start_server(ctx, system, "cpu2") as server:
        two, _, err2 = _http_runs(ctx, server, 8)
    ratio = [b / a for a, b in zip(one, two, strict=False) if a]
    return {
        SCALING_METRICS[0].name: (one, _error_note(err1)),
        SCALING_METRICS[1].name: (two, _error_note(err2)),
        SCALING_METRICS[2].name: (ratio, ""),
    }


MULTIPROXY_METRICS = [
    Metric("requests/s, 32 connections, 1 proxy", "req/s"),
    Metric("requests/s, 32 connections, 2 proxies", "req/s"),
    Metric("2 proxies over 1", "x"),
    Metric("CPU per request, 1 proxy", "µs", "lower"),
    Metric("CPU per request, 2 proxies", "µs", "lower"),
]


def scenario_multiproxy(ctx: Context, system: str) -> Measured:
    """HTTP no-op on 2 replicas through 1 and then 2 proxy processes on one port
    (baseline: bare uvicorn with 1 and 2 workers)."""
    if system == "ray":
        raise Unavailable("skipped", "fleet's num_proxies against uvicorn workers")
    out: dict[int, tuple[list[float], list[float], int]] = {}
    for n in (1, 2):
        if system == "fleet":
            server = start_server(ctx, system, "noop2", "--num-proxies", str(n))
        else:
            server = start_server(ctx, system, "noop", "--workers", str(n))
        with server:
            out[n] = _http_runs(ctx, server, ctx.http_conns)
    ratio = [b / a for a, b in zip(out[1][0], out[2][0], strict=False) if a]
    names = [m.name for m in MULTIPROXY_METRICS]
    values = [(out[1][0], _error_note(out[1][2])), (out[2][0], _error_note(out[2][2])),
              (ratio, ""), (out[1][1], ""), (out[2][1], "")]
    return dict(zip(names, values, strict=True))


METRICS_METRICS = [
    Metric("requests/s, metrics on, 32 connections", "req/s"),
    Metric("requests/s, metrics off, 32 connections", "req/s"),
    Metric("requests/s on / off", "x"),
    Metric("CPU per request, metrics on", "µs", "lower"),
    Metric("CPU per request, metrics off", "µs", "lower"),
    Metric("CPU per request in the proxy, metrics on", "µs", "lower"),
    Metric("CPU per request in the proxy, metrics off", "µs", "lower"),
]


def scenario_metrics(ctx: Context, system: str) -> Measured:
    """HTTP no-op with fleet's metrics on and off (FLEET_METRICS=0), one fresh server
    per run, the two alternating (and which goes first alternating too), so the
    machine's drift falls on both alike."""
    if system != "fleet":
        raise Unavailable("skipped", "fleet's own metrics, on against off")
    rps: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    proxy: dict[str, list[float]] = {"on": [], "off": []}
    errors = 0
    for i in range(ctx.runs):
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            one = replace(ctx, runs=1, extra_env={**ctx.extra_env,
                                                  "FLEET_METRICS": "1" if mode == "on" else "0"})
            roles: dict[str, list[float]] = {}
            with start_server(one, system, "noop") as server:
                r, c, e = _http_runs(one, server, ctx.http_conns, roles)
            rps[mode] += r
            cpu[mode] += c
            proxy[mode] += roles["proxy"]
            errors += e
    ratio = [a / b for a, b in zip(rps["on"], rps["off"], strict=True) if b]
    names = [m.name for m in METRICS_METRICS]
    values = [(rps["on"], _error_note(errors)), (rps["off"], ""), (ratio, ""),
              (cpu["on"], ""), (cpu["off"], ""), (proxy["on"], ""), (proxy["off"], "")]
    return dict(zip(names, values, strict=True))


COLDSTART_METRICS = [
    Metric("launch to first HTTP 200", "s", "lower"),
    Metric("idle RSS, all processes", "MiB", "lower"),
    Metric("idle PSS, all processes", "MiB", "lower"),
    Metric("processes when idle", "count", "lower"),
    Metric("stop after SIGINT", "s", "lower"),
]


def _cli_argv(system: str, port: int, workdir: Path) -> list[str]:
    """The command a user runs to serve the no-op app from the command line."""
    if system == "fleet":
        exe = shutil.which("fleet")
        prefix = [exe] if exe else [sys.executable, "-c", "from fleet._cli import main; main()"]
        return [*prefix, "run", "bench.noop_app:noop", "--host", "127.0.0.1", "--port", str(port)]
    if system == "ray":
        config = workdir / "serve_noop.yaml"
        config.write_text(
            "proxy_location: HeadOnly\n"
            f"http_options:\n  host: 127.0.0.1\n  port: {port}\n"
            "applications:\n  - name: default\n    route_prefix: /\n"
            "    import_path: bench.ray_apps:noop\n"
        )
        exe = shutil.which("serve")
        prefix = [exe] if exe else [sys.executable, "-m", "ray.serve.scripts"]
        return [*prefix, "run", "--address", "local", str(config)]
    return [sys.executable, "-m", "uvicorn", "bench.baseline:noop", "--host", "127.0.0.1",
            "--port", str(port), "--loop", "uvloop", "--http", "httptools",
            "--log-level", "warning"]


def _coldstart_env(ctx: Context, workdir: Path) -> dict[str, str]:
    """The launches' environment: bytecode written to and read from a cache in workdir,
    even where the machine's environment says not to write it (PYTHONDONTWRITEBYTECODE),
    so that the launch measured is what a user's second launch is, for every system."""
    env = ctx.env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    return env


def _one_coldstart(ctx: Context, system: str, workdir: Path) -> dict[str, float]:
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    t0 = time.monotonic()
    proc = subprocess.Popen(_cli_argv(system, port, workdir), cwd=REPO_ROOT,
                            env=_coldstart_env(ctx, workdir),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        try:
            ready = loadgen.wait_http_ok(port, timeout_s=240)
        except TimeoutError:
            log.seek(0)
            raise RuntimeError("no HTTP 200: " + " / ".join(log.read().splitlines()[-5:])) \
                from None
        time.sleep(max(2.0, min(ctx.warmup_s, 5.0)))
        mem = tree_memory(proc.pid)
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
            stop_s = time.monotonic() - t_stop
        except subprocess.TimeoutExpired:
            stop_s = math.nan
        return {"start_s": ready - t0, "stop_s": stop_s, **mem}
    finally:
        kill_tree(proc.pid, grace_s=5)
        log.close()


def scenario_coldstart(ctx: Context, system: str) -> Measured:
    """CLI launch to first 200, idle memory of the whole instance, and stop time."""
    samples: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        _one_coldstart(ctx, system, Path(tmp))      # not measured: compiles the bytecode
        for _ in range(max(1, min(ctx.runs, 3))):
            samples.append(_one_coldstart(ctx, system, Path(tmp)))
    keys = ["start_s", "rss_mib", "pss_mib", "processes", "stop_s"]
    return {m.name: ([s[k] for s in samples], "") for m, k in
            zip(COLDSTART_METRICS, keys, strict=True)}


ScenarioFn = Callable[[Context, str], Measured]
SCENARIOS: dict[str, tuple[list[Metric], ScenarioFn]] = {
    "http": (HTTP_METRICS, scenario_http),
    "grpc": (GRPC_METRICS, scenario_grpc),
    "grpcnoop": (GRPC_METRICS, scenario_grpcnoop),
    "protocols": (PROTOCOL_METRICS, scenario_protocols),
    "handle": (HANDLE_METRICS, scenario_handle),
    "batch": (BATCH_METRICS, scenario_batch),
    "mlp": (BATCH_METRICS, scenario_mlp),
    "scaling": (SCALING_METRICS, scenario_scaling),
    "multiproxy": (MULTIPROXY_METRICS, scenario_multiproxy),
    "coldstart": (COLDSTART_METRICS, scenario_coldstart),
    "metrics": (METRICS_METRICS, scenario_metrics),
}


# What fleet on the Ray backend is measured on: fleet's data plane with Ray placing
# the processes.
FLEET_RAY_SCENARIOS = ("http", "handle")


def run_scenario(ctx: Context, name: str, system: str, unavailable: str | None) -> list[Row]:
    """Run one scenario for one system and turn the outcome into report rows."""
    metrics, fn = SCENARIOS[name]
    if unavailable:
        status, _, note = unavailable.partition(":")
        return [Row.unavailable(name, m, system, status.strip(), note.strip()) for m in metrics]
    try:
        if system == "fleet-ray" and name not in FLEET_RAY_SCENARIOS:
            raise Unavailable("skipped", "fleet on Ray runs the http and handle scenarios")
        measured = fn(ctx, system)
    except Unavailable as exc:
        return [Row.unavailable(name, m, system, exc.status, exc.note) for m in metrics]
    except Exception as exc:  # noqa: BLE001 - one failing system must not stop the suite
        note = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
        ctx.log(f"  {name}/{system} failed: {exc}")
        return [Row.unavailable(name, m, system, "error", note[:200]) for m in metrics]
    rows = []
    for metric in metrics:
        values, note = measured.get(metric.name, ([], "not measured"))
        if not values and ":" in note:
            status, _, text = note.partition(":")
            rows.append(Row.unavailable(name, metric, system, status.strip(), text.strip()))
        else:
            rows.append(Row.measured(name, metric, system, values, note))
    return rows


def describe(info: dict[str, Any]) -> str:
    """One-line summary of server info, for progress output."""
    return ", ".join(f"{k}={v}" for k, v in info.items() if not k.endswith("_hex"))
