"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

import fleet

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout_s: float = 15.0, what: str = "") -> T:
    """Poll state that fleet changes in other processes until cond() is truthy; fail
    after timeout_s, naming what it waited for. Returns the truthy value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met in {timeout_s:g} s: {what or cond}")


@contextlib.contextmanager
def stderr_into(path: Path) -> Iterator[None]:
    """Point fd 2 at path while an instance starts: its processes inherit it and log
    there."""
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(fd)
        os.close(saved)


class RawClient:
    """A raw HTTP/1.1 client socket on 127.0.0.1 reading whole responses one at a time
    (content-length or chunked); ``head`` is the last response's head as sent."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.head = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.head = head
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._line(), 16):
                body += self._take(size)
                self._take(2)
            self._take(2)
        else:
            body = self._take(int(headers.get("content-length", "0")))
        return int(lines[0].split()[1]), headers, body

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


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
    proc.wait(60)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left behind: {alive}"


class MemoryInstance:
    """A fleet instance on the memory backend in this process, as fleet.start() would
    make one: fleet.run, fleet.status, handles and fleet.shutdown reach it, every
    replica is a task on its loop (no process starts), and :meth:`http` speaks HTTP to
    the HTTP proxy's own ASGI app with a runtime of its own, as a proxy process has."""

    def __init__(self) -> None:
        from fleet import _api
        from fleet._backends.memory import MemoryBackend
        from fleet._config import GRPCOptions, HTTPOptions
        self.inst = _api.Instance(HTTPOptions(enabled=False), GRPCOptions(enabled=False),
                                  backend=MemoryBackend(), register=False)
        self._proxy: Any = None
        self._asgi: Any = None
        self._clients: list[Any] = []

    def start(self) -> MemoryInstance:
        from fleet import _api
        self.inst.start()
        with _api._lock:
            _api._instance = self.inst
        return self

    @property
    def controller(self) -> Any:
        return self.inst.controller

    @property
    def backend(self) -> Any:
        return self.inst.backend

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the instance's loop and wait for it."""
        return self.inst.call(coro, timeout)

    def http(self, **http_options: Any) -> httpx.Client:
        """An httpx.Client for the proxy's app (one proxy, built on first use)."""
        from fleet._config import HTTPOptions
        if self._asgi is None:
            self.call(self._start_proxy(HTTPOptions(**http_options)))
        client = httpx.Client(transport=_MemoryTransport(self), base_url="http://testserver",
                              timeout=60)
        self._clients.append(client)
        return client

    def async_http(self, **http_options: Any) -> httpx.AsyncClient:
        """An httpx.AsyncClient for the proxy's app, for a loop of the test's own."""
        from fleet._config import HTTPOptions
        if self._asgi is None:
            self.call(self._start_proxy(HTTPOptions(**http_options)))
        return httpx.AsyncClient(transport=_AsyncMemoryTransport(self),
                                 base_url="http://testserver", timeout=60)

    async def _start_proxy(self, options: Any) -> None:
        from fleet._proxy.http import build_app
        from fleet._runtime import Runtime
        proxy = Runtime(self.inst.loop, self.inst.address, self.inst.secret)
        await proxy.connect_controller(subscribe=True)
        self._proxy = proxy
        self._asgi = build_app(proxy, options)

    async def send(self, request: httpx.Request, body: bytes) -> tuple[int, Any, bytes]:
        rt = self.inst.runtime
        # what fleet.run returned after is in the driver's tables: the proxy follows
        if rt is not None and rt.tables is not None:
            await asyncio.wait_for(self._proxy.wait_tables(rt.tables["version"]), 30)
        transport = httpx.ASGITransport(app=self._asgi)
        inner = httpx.Request(request.method, request.url, headers=request.headers,
                              content=body)
        response = await transport.handle_async_request(inner)
        content = await response.aread()
        return response.status_code, response.headers.raw, content

    def shutdown(self) -> None:
        from fleet import _api
        for client in self._clients:
            client.close()
        proxy = self._proxy
        if proxy is not None and proxy.controller is not None and self.inst.thread.is_alive():
            self.inst.loop.call_soon_threadsafe(proxy.controller.close)
        with _api._lock:
            if _api._instance is self.inst:
                _api._instance = None
        self.inst.shutdown()


class _MemoryTransport(httpx.BaseTransport):
    """An httpx transport that runs each request on the instance's loop."""

    def __init__(self, mem: MemoryInstance) -> None:
        self.mem = mem

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        fut = asyncio.run_coroutine_threadsafe(self.mem.send(request, body), self.mem.inst.loop)
        status, headers, content = fut.result(60)
        return httpx.Response(status, headers=headers, content=content, request=request)


class _AsyncMemoryTransport(httpx.AsyncBaseTransport):
    """The same from another event loop: each request runs on the instance's loop."""

    def __init__(self, mem: MemoryInstance) -> None:
        self.mem = mem

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        fut = asyncio.run_coroutine_threadsafe(self.mem.send(request, body), self.mem.inst.loop)
        status, headers, content = await asyncio.wait_for(asyncio.wrap_future(fut), 60)
        return httpx.Response(status, headers=headers, content=content, request=request)
