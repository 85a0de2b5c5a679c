"""fleet under faults and hostile clients, measured as a user would see it:
``python -m bench.reliability [--quick] [--out DIR]``.

Scenarios (the README's Reliability section shows the figures):

- ``kill``: SIGKILL one of two replicas (10 ms handler) under 100 req/s.
- ``overload``: 10x the capacity of one replica (20 ms handler, max_ongoing_requests=2,
  max_queued_requests=10) for 20 s.
- ``hostile``: 2,000 malformed and hostile HTTP requests and 10,000 fuzzed gRPC messages.
- ``memory``: a client that reads nothing from an endless stream (HTTP and handle), a
  gRPC request stream flood and a websocket flood.

The bench process is the driver; its load generators are raw sockets and grpc.aio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import psutil

import fleet
from bench.loadgen import percentile, run_async
from bench.reliability_apps import SERVICE, Hostile, Sleepy, WsSink

SERVICER_FN = "bench.reliability_apps.add_ReliabilityServicer_to_server"
MB = 1024 * 1024


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- processes --------------------------------------------------------------------------
def _replica_pids(app: str, deployment: str) -> list[int]:
    deps = fleet.status()["applications"][app]["deployments"][deployment]
    return [r["pid"] for r in deps["replicas"] if r["state"] == "RUNNING" and r["pid"]]


def _proxy_pids() -> list[int]:
    return [p["pid"] for p in fleet.status()["proxies"].values() if p.get("pid")]


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / MB


def _alive(pids: list[int]) -> bool:
    return all(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


class _Peak:
    """Samples the RSS of some processes in a thread; .peak is the largest seen."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = _rss_mb(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _rss_mb(self.pids))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


# -- an open-loop HTTP client on raw sockets ---------------------------------------------
class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; answers (status, body)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.alive = True

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        length = 0
        chunked = False
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
            elif line == b"transfer-encoding: chunked":
                chunked = True
            elif line == b"connection: close":
                self.alive = False
        if chunked:         # fleet's own error answers; only their status matters here
            term = self.buf.find(b"0\r\n\r\n", end + 4)
            if term < 0:
                return
            body = b""
            del self.buf[:term + 5]
        else:
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((0, b""))


async def open_loop(port: int, path: str, rate: float, duration_s: float,
                    timeout_s: float = 10.0, at: dict[float, Any] | None = None
                    ) -> list[tuple[float, float, int, bytes]]:
    """GET path at `rate` per second for duration_s, whatever the answers' pace; each
    result is (sent at, latency, status, body), status 0 for a closed connection and
    -1 for no answer within timeout_s. `at` maps seconds from the start to callbacks."""
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    idle: list[_Conn] = []
    results: list[tuple[float, float, int, bytes]] = []
    start = loop.time()
    begun = time.perf_counter()

    async def one() -> None:
        conn = None
        while idle and conn is None:
            conn = idle.pop()
            if not conn.alive:      # the server closed it while it was idle
                conn = None
        if conn is None:
            _, conn = await loop.create_connection(_Conn, "127.0.0.1", port)
        sent = time.perf_counter()      # uvloop's clock counts whole milliseconds
        try:
            status, body = await asyncio.wait_for(conn.request(request), timeout_s)
        except asyncio.TimeoutError:
            status, body = -1, b""
            conn.alive = False
            assert conn.transport is not None
            conn.transport.close()
        results.append((sent - begun, time.perf_counter() - sent, status, body))
        if conn.alive:
            idle.append(conn)

    for when, fn in sorted((at or {}).items()):
        loop.call_at(start + when, fn)
    tasks = []
    for i in range(int(rate * duration_s)):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one()))
    await asyncio.gather(*tasks)
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    return results


# -- scenarios ------------------------------------------------------------------------------
def scenario_kill(quick: bool) -> dict[str, Any]:
    fleet.run(Sleepy.options(name="Killed", num_replicas=2).bind(10), name="kill",
              route_prefix="/kill")
    port = fleet.status()["proxies"]["http"]["port"]
    before = _replica_pids("kill", "Killed")
    victim = before[0]
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(asyncio.get_running_loop().time())
        os.kill(victim, signal.SIGKILL)

    duration = 6.0 if quick else 10.0
    results: Any = run_async(open_loop(port, "/kill", 100, duration, at={2.0: kill}))
    failed = [r for r in results if r[2] != 200]
    new = [r for r in results if r[2] == 200 and int(r[3]) not in before]
    replaced_s = (min(r[0] + r[1] for r in new) - 2.0) if new else None
    fleet.delete("kill")
    return {"requests": len(results), "failed": len(failed),
            "failed_statuses": dict(Counter(r[2] for r in failed)),
            "hung": sum(1 for r in results if r[2] == -1),
            "replacement_serves_after_s": replaced_s}


def scenario_overload(quick: bool) -> dict[str, Any]:
    fleet.run(Sleepy.options(name="Overloaded", num_replicas=1, max_ongoing_requests=2,
                             max_queued_requests=10).bind(20),
              name="overload", route_prefix="/overload")
    port = fleet.status()["proxies"]["http"]["port"]
    pids = _replica_pids("overload", "Overloaded") + _proxy_pids()
    idle: Any = run_async(open_loop(port, "/overload", 20, 2.0))
    idle_p50 = percentile([r[1] for r in idle], 50)
    rss_before = _rss_mb(pids)
    duration = 5.0 if quick else 20.0
    capacity = 2 / 0.020
    results: Any = run_async(open_loop(port, "/overload", 10 * capacity, duration))
    ok = [r[1] for r in results if r[2] == 200]
    refused = [r[1] for r in results if r[2] == 503]
    time.sleep(1.0)
    rss_after = _rss_mb(pids)
    fleet.delete("overload")
    return {"capacity_rps": capacity, "offered_rps": 10 * capacity,
            "goodput_rps": len(ok) / duration,
            "goodput_of_capacity": len(ok) / duration / capacity,
            "idle_p50_ms": idle_p50 * 1000,
            "accepted_p99_ms": percentile(ok, 99) * 1000 if ok else None,
            "p99_bound_ms": (idle_p50 + 10 * 0.020 / 2) * 1000 * 1.2,
            "refused_503": len(refused),
            "refused_p50_ms": percentile(refused, 50) * 1000 if refused else None,
            "other": dict(Counter(r[2] for r in results if r[2] not in (200, 503))),
            "rss_before_mb": rss_before, "rss_after_mb": rss_after}


def _hostile_payloads(n: int) -> list[tuple[str, bytes, bytes]]:
    """(kind, what to send, what to send after a pause) for n requests."""
    head = b"POST /hostile HTTP/1.1\r\nHost: bench\r\n"
    kinds: list[tuple[str, bytes, bytes]] = [
        ("huge header value", b"GET /hostile HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20)
         + b"\r\n\r\n", b""),
        ("many headers", b"GET /hostile HTTP/1.1\r\n"
         + b"".join(b"X-%d: v\r\n" % i for i in range(5000)) + b"\r\n", b""),
        ("long request line", b"GET /" + b"p" * 20000 + b" HTTP/1.1\r\n\r\n", b""),
        ("garbage", bytes(random.getrandbits(8) for _ in range(300)) + b"\r\n\r\n", b""),
        ("bad version", b"GET /hostile HTTP/9.9\r\n\r\n", b""),
        ("bad chunk size", head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
         b""),
        ("length and chunked", head + b"Content-Length: 5\r\nTransfer-Encoding: chunked"
         b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b""),
        ("bad content-length", head + b"Content-Length: -5\r\n\r\n", b""),
        ("declared 200 MB body", head + b"Content-Length: 200000000\r\n\r\n", b""),
        ("body shorter than declared", head + b"Content-Length: 100\r\n\r\nshort", b""),
        ("NUL in path", b"GET /hos\x00tile HTTP/1.1\r\nHost: b\r\n\r\n", b""),
        ("control chars in path", b"GET /%1b%5b31m%0a HTTP/1.1\r\nHost: b\r\n\r\n", b""),
    ]
    out = [kinds[i % len(kinds)] for i in range(n)]
    return out


async def _hostile_one(port: int, payload: bytes, timeout_s: float) -> str:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "refused"
    try:
        writer.write(payload)
        try:
            await writer.drain()
        except OSError:
            pass
        try:
            line = await asyncio.wait_for(reader.readline(), timeout_s)
        except asyncio.TimeoutError:    # before OSError: a subclass of it since 3.11
            return "hang"
        except (ConnectionError, OSError):
            return "closed"
        if not line:
            return "closed"
        status = line.split(b" ")[1].decode() if line.startswith(b"HTTP/1.1 ") else "?"
        return status
    finally:
        writer.close()


async def _hostile_http(port: int, n: int, slowloris: int) -> Counter[str]:
    sem = asyncio.Semaphore(32)
    outcomes: Counter[str] = Counter()

    async def bounded(payload: bytes) -> None:
        async with sem:
            outcomes[await _hostile_one(port, payload, 30)] += 1

    async def slow() -> None:
        # half a head, then one byte every second: cut off at header_timeout_s
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            outcomes["refused"] += 1
            return
        writer.write(b"GET /hostile HTTP/1.1\r\nHost: bench\r\n")
        result = "hang"
        for _ in range(30):
            try:
                line = await asyncio.wait_for(reader.readline(), 1.0)
                result = line.split(b" ")[1].decode() if line else "closed"
                break
            except asyncio.TimeoutError:
                writer.write(b"X")
            except (ConnectionError, OSError):
                result = "closed"
                break
        writer.close()
        outcomes[result] += 1

    await asyncio.gather(*(bounded(p) for _, p, _ in _hostile_payloads(n - slowloris)),
                         *(slow() for _ in range(slowloris)))
    return outcomes


async def _big_bodies(port: int, count: int, size: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    block = b"b" * MB
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /hostile HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n"
                     % size)
        left = size
        while left > 0:
            writer.write(block[:min(left, MB)])
            left -= MB
            await writer.drain()
        line = await reader.readline()
        outcomes[line.split(b" ")[1].decode() if line else "closed"] += 1
        writer.close()
    return outcomes


async def _fuzz_grpc(port: int, n: int) -> Counter[str]:
    from bench.predict_pb import PredictRequest
    valid = PredictRequest(input={"a": b"1", "b": b"2"}).SerializeToString()
    md = (("application", "hostile"),)
    outcomes: Counter[str] = Counter()
    sem = asyncio.Semaphore(64)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        async def one(i: int) -> None:
            rng = random.Random(i)
            kind = i % 4
            if kind == 0:
                data = rng.randbytes(rng.randrange(0, 512))
            elif kind == 1:
                data = bytearray(valid)
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
                data = bytes(data)
            elif kind == 2:
                data = valid[:rng.randrange(len(valid))]
            else:
                data = rng.randbytes(rng.randrange(0, 64))
            method = f"/{SERVICE}/Predict" if i % 10 else f"/{SERVICE}/N{rng.getrandbits(32)}"
            call = channel.unary_unary(method)
            async with sem:
                try:
                    await call(data, metadata=md, timeout=30)
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    outcomes[exc.code().name] += 1
        await asyncio.gather(*(one(i) for i in range(n)))
    return outcomes


def scenario_hostile(quick: bool) -> dict[str, Any]:
    fleet.run(Hostile.bind(), name="hostile", route_prefix="/hostile")
    st = fleet.status()
    http_port, grpc_port = st["proxies"]["http"]["port"], st["proxies"]["grpc"]["port"]
    pids = _replica_pids("hostile", "Hostile") + _proxy_pids()
    rss_before = _rss_mb(pids)
    n = 400 if quick else 2000
    big = 2 if quick else 5
    t0 = time.monotonic()
    http: Any = run_async(_hostile_http(http_port, n - big, slowloris=20 if quick else 100))
    bodies: Any = run_async(_big_bodies(http_port, big, 100_000_000))
    http_s = time.monotonic() - t0
    time.sleep(1.0)
    rss_after_http = _rss_mb(pids)
    t0 = time.monotonic()
    fuzz: Any = run_async(_fuzz_grpc(grpc_port, 2000 if quick else 10000))
    grpc_s = time.monotonic() - t0
    alive = _alive(pids)
    rss_after = _rss_mb(pids)
    fleet.delete("hostile")
    return {"http_requests": n, "http_outcomes": dict(http), "big_bodies": dict(bodies),
            "http_s": http_s, "grpc_messages": sum(fuzz.values()), "grpc_outcomes": dict(fuzz),
            "grpc_s": grpc_s, "all_processes_alive": alive, "rss_before_mb": rss_before,
            "rss_after_http_mb": rss_after_http, "rss_after_mb": rss_after}


def _p50_ms(port: int) -> float:
    """Median latency of other clients' requests (20 req/s for 2 s)."""
    results: Any = run_async(open_loop(port, "/hostile", 20, 2.0))
    return percentile([r[1] for r in results if r[2] == 200], 50) * 1000


def _memory_case(name: str, pids: list[int], run: Any, hold_s: float,
                 port: int) -> dict[str, Any]:
    before = _rss_mb(pids)
    idle_ms = _p50_ms(port)
    peak = _Peak(pids)
    stop = run()
    started = time.monotonic()
    during_ms = _p50_ms(port)
    time.sleep(max(0.0, hold_s - (time.monotonic() - started)))
    top = peak.stop()
    stop()
    return {"case": name, "rss_before_mb": before, "rss_peak_mb": top,
            "growth_mb": top - before, "others_p50_ms_before": idle_ms,
            "others_p50_ms_during": during_ms}


def scenario_memory(quick: bool) -> dict[str, Any]:
    fleet.run(Hostile.bind(), name="hostile", route_prefix="/hostile")
    fleet.run(WsSink.bind(), name="ws", route_prefix="/ws")
    st = fleet.status()
    http_port, grpc_port = st["proxies"]["http"]["port"], st["proxies"]["grpc"]["port"]
    pids = _replica_pids("hostile", "Hostile") + _replica_pids("ws", "WsSink") + _proxy_pids()
    hold = 3.0 if quick else 10.0
    cases = []

    def slow_reader() -> Any:
        sock = socket.create_connection(("127.0.0.1", http_port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /hostile/endless HTTP/1.1\r\nHost: bench\r\n\r\n")
        return sock.close
    cases.append(_memory_case("HTTP client reading nothing of an endless stream that "
                              "never awaits", pids, slow_reader, hold, http_port))

    def handle_reader() -> Any:
        gen = fleet.get_deployment_handle("Hostile", "hostile").numbers.options(
            stream=True).remote()
        it = iter(gen)
        next(it)
        return gen.cancel
    cases.append(_memory_case("handle stream read once, generator never awaits",
                              pids + [os.getpid()], handle_reader, hold, http_port))

    def grpc_flood() -> Any:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        join = channel.stream_unary(f"/{SERVICE}/Join")
        message = b"m" * (3 * MB)
        call = join.future((message for _ in range(300)), metadata=(("application", "hostile"),))

        def stop() -> None:
            call.cancel()
            channel.close()
        return stop
    cases.append(_memory_case("gRPC request stream flood, 300 x 3 MiB, handler reads one",
                              pids, grpc_flood, hold, http_port))

    def ws_flood() -> Any:
        from websockets.sync.client import connect
        ws = connect(f"ws://127.0.0.1:{http_port}/ws/ws", max_size=None,
                     compression=None).__enter__()
        done = threading.Event()

        def flood() -> None:
            message = b"w" * (256 * 1024)
            try:
                while not done.is_set():
                    ws.send(message)
            except Exception:
                pass
        threading.Thread(target=flood, daemon=True).start()

        def stop() -> None:
            done.set()
            ws.close_socket()
        return stop
    cases.append(_memory_case("websocket flood, app reads one message", pids, ws_flood,
                              hold, http_port))
    fleet.delete("hostile")
    fleet.delete("ws")
    return {"cases": cases}


SCENARIOS = {"kill": scenario_kill, "overload": scenario_overload,
             "hostile": scenario_hostile, "memory": scenario_memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer requests")
    parser.add_argument("--out", default="bench-reliability")
    args = parser.parse_args(argv)
    fleet.start(http_options={"port": 0, "access_log": False},
                grpc_options={"port": 0, "grpc_servicer_functions": [SERVICER_FN]})
    found: dict[str, Any] = {}
    try:
        for name in args.scenarios.split(","):
            _log(f"reliability: {name}")
            found[name] = SCENARIOS[name](args.quick)
            _log(json.dumps(found[name], indent=1))
    finally:
        fleet.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(found, indent=1))
    _log(f"wrote {out / 'reliability.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
