"""Load generators: ``wrk`` when installed, else a built-in asyncio HTTP/1.1 client.

The built-in client keeps one keep-alive connection per concurrent caller and
parses responses with a minimal protocol (status line, ``Content-Length`` or
chunked body), so the client costs little CPU next to the server.  The gRPC
generator uses ``grpc.aio`` with raw request bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.procs import LOOPBACK


@dataclass
class LoadResult:
    """Outcome of one measured load window."""

    requests: int
    errors: int
    duration_s: float
    tool: str
    latencies_s: list[float] = field(default_factory=list)
    p50_s: float | None = None
    p99_s: float | None = None
    first_error: str = ""

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def percentile(self, q: float) -> float | None:
        """Latency percentile ``q`` (0-100) in seconds, from samples or from wrk."""
        if self.latencies_s:
            return percentile(self.latencies_s, q)
        return {50.0: self.p50_s, 99.0: self.p99_s}.get(float(q))


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``samples``."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    """Median of ``values`` (NaN when empty)."""
    return statistics.median(values) if values else float("nan")


def wrk_path() -> str | None:
    """Path of the ``wrk`` binary, or None when it is not installed."""
    return shutil.which("wrk")


def _new_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop, uvloop's when available."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_async(coro: object) -> object:
    """Run a coroutine to completion on a fresh (uv)loop."""
    loop = _new_loop()
    try:
        return loop.run_until_complete(coro)  # type: ignore[arg-type]
    finally:
        loop.close()


class _HttpConn(asyncio.Protocol):
    """One keep-alive connection sending the same request back to back."""

    def __init__(self, request: bytes, stop_at: float, record: list[float]) -> None:
        self.request = request
        self.stop_at = stop_at
        self.latencies = record
        self.errors = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            size = self._response_size()
            if size is None:
                return
            head = bytes(self.buf[:12])
            del self.buf[:size]
            now = time.perf_counter()
            if head[9:10] == b"2":
                self.latencies.append(now - self.sent_at)
            else:
                self.errors += 1
            if now >= self.stop_at:
                self._finish()
                return
            self._send()

    def _response_size(self) -> int | None:
        """Byte length of the first complete response in the buffer, if any."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buf[:end]).lower()
        body_start = end + 4
        match = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
        if match:
            size = body_start + int(match.group(1))
            return size if len(self.buf) >= size else None
        if b"transfer-encoding: chunked" in head:
            term = self.buf.find(b"0\r\n\r\n", body_start)
            return term + 5 if term >= 0 else None
        return body_start

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if time.perf_counter() < self.stop_at:
                self.errors += 1
            self.done.set_result(None)


async def _http_load(
    port: int, path: str, connections: int, duration_s: float, host: str,
    json_body: bytes | None = None,
) -> LoadResult:
    loop = asyncio.get_running_loop()
    if json_body is None:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: fleet-bench\r\n\r\n"
        ).encode()
    else:
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: fleet-bench\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(json_body)}\r\n\r\n"
        ).encode() + json_body
    latencies: list[float] = []
    start = time.perf_counter()
    stop_at = start + duration_s
    conns: list[_HttpConn] = []
    for _ in range(connections):
        proto = _HttpConn(request, stop_at, latencies)
        try:
            await loop.create_connection(lambda p=proto: p, host, port)  # type: ignore[misc]
        except OSError:
            proto.errors += 1
            proto.done.set_result(None)
        conns.append(proto)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(c.done for c in conns)), timeout=duration_s + 30
        )
    elapsed = time.perf_counter() - start
    for conn in conns:
        conn._finish()
    return LoadResult(
        requests=len(latencies),
        errors=sum(c.errors for c in conns),
        duration_s=elapsed,
        tool="builtin",
        latencies_s=latencies,
    )


_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _wrk_time(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"bad wrk time {text!r}")
    return float(match.group(1)) * _UNIT[match.group(2)]


def parse_wrk(output: str) -> LoadResult:
    """Parse the text that ``wrk --latency`` prints."""
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if not total:
        raise ValueError(f"unexpected wrk output:\n{output}")
    requests = int(total.group(1))
    duration = float(total.group(2)) * _UNIT[total.group(3)]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    errors = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        errors += sum(int(g) for g in sock.groups())
    pcts = {m.group(1): _wrk_time(m.group(2)) for m in re.finditer(r"\s(\d+)%\s+(\S+)", output)}
    return LoadResult(
        requests=max(0, requests - errors),
        errors=errors,
        duration_s=duration,
        tool="wrk",
        p50_s=pcts.get("50"),
        p99_s=pcts.get("99"),
    )


def http_load(
    port: int,
    path: str = "/",
    connections: int = 32,
    duration_s: float = 5.0,
    use_wrk: bool = True,
    host: str = LOOPBACK,
    json_body: bytes | None = None,
) -> LoadResult:
    """Drive ``GET http://host:port/path`` with ``connections`` keep-alive callers
    (``POST`` of ``json_body`` when given, always with the built-in client)."""
    wrk = wrk_path() if use_wrk and json_body is None else None
    if wrk:
        threads = max(1, min(2, connections))
        argv = [
            wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            "--latency", "--timeout", "30s", f"http://{host}:{port}{path}",
        ]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
        return parse_wrk(out.stdout)
    result = run_async(_http_load(port, path, connections, duration_s, host, json_body))
    assert isinstance(result, LoadResult)
    return result


async def _grpc_load(
    target: str,
    method: str,
    payload: bytes,
    metadata: Sequence[tuple[str, str]],
    concurrency: int,
    duration_s: float,
) -> LoadResult:
    import grpc

    latencies: list[float] = []
    errors = 0
    first_error = ""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        start = time.perf_counter()
        stop_at = start + duration_s

        async def caller() -> None:
            nonlocal errors, first_error
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    await call(payload, metadata=tuple(metadata), timeout=30)
                except grpc.aio.AioRpcError as exc:
                    errors += 1
                    first_error = first_error or f"{exc.code().name}: {exc.details()}"
                    await asyncio.sleep(0.01)
                    continue
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return LoadResult(len(latencies), errors, elapsed, "grpc.aio", latencies,
                      first_error=first_error)


def grpc_load(
    port: int,
    method: str,
    payload: bytes,
    metadata: Sequence[tuple[str, str]] = (),
    concurrency: int = 32,
    duration_s: float = 5.0,
) -> LoadResult:
    """Send unary ``method`` calls with raw ``payload`` from ``concurrency`` callers."""
    coro = _grpc_load(f"{LOOPBACK}:{port}", method, payload, metadata, concurrency, duration_s)
    result = run_async(coro)
    assert isinstance(result, LoadResult)
    return result


def wait_http_ok(port: int, path: str = "/", timeout_s: float = 120.0) -> float:
    """Poll until ``GET path`` answers 200; returns the monotonic time it did."""
    import http.client

    deadline = time.monotonic() + timeout_s
    while True:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
        try:
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return time.monotonic()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no HTTP 200 from port {port} in {timeout_s}s")
        time.sleep(0.005)
