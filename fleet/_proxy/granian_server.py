"""The HTTP proxy on Granian: the same ASGI app, served by Granian's embedded server.

Granian parses HTTP and writes responses in Rust, which is where a Python proxy
spends most of its time (see bench/README.md). It runs in the proxy process itself
(``granian.server.embed``), so it costs no supervisor process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from fleet._proxy.startup import proxy_failed
from fleet._runtime import Runtime

if TYPE_CHECKING:
    from fleet._config import HTTPOptions

log = logging.getLogger("fleet.proxy")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _coroutine_receive(app: Any) -> Any:
    """Granian's ``receive()`` returns an awaitable that is not a coroutine; the proxy
    hands it to ``create_task``, so make it one."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def coroutine_receive() -> Any:
            return await receive()

        await app(scope, coroutine_receive, send)

    return wrapped


async def serve_granian(runtime: Runtime, options: HTTPOptions, app: Any,
                        stop: asyncio.Event) -> int:
    """Serve app until stop is set; reports the bound port to the controller."""
    try:
        from granian.constants import Interfaces
        from granian.http import HTTP1Settings
        from granian.server.embed import Server
    except ImportError:
        return await proxy_failed(runtime, "http", "http_options server='granian' needs "
                                                   "Granian: pip install granian")
    port = options.port or _free_port(options.host)
    try:
        # Granian binds in its own thread and reports failure only in its log: check
        # the port first so a taken one fails loudly.
        family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((options.host, port))
    except OSError as exc:
        return await proxy_failed(runtime, "http",
                                  f"the HTTP proxy cannot listen on {options.host}:{port}: {exc}")
    logging.getLogger("granian").setLevel(logging.ERROR)
    logging.getLogger("_granian").setLevel(logging.ERROR)
    # Granian's own limits stand in for the uvicorn protocol's (see the README's
    # Reliability section for what differs): its head buffer for max_header_bytes,
    # its head timeout (which also bounds an idle keep-alive) for header_timeout_s,
    # and its cap on requests in flight for max_connections.
    http1 = HTTP1Settings(header_read_timeout=int(options.header_timeout_s * 1000),
                          max_buffer_size=max(8192, options.max_header_bytes))
    server = Server(_coroutine_receive(app), address=options.host, port=port,
                    interface=Interfaces.ASGINL, runtime_threads=1, log_enabled=False,
                    backlog=2048, http1_settings=http1, backpressure=options.max_connections)
    task = asyncio.get_running_loop().create_task(server.serve())
    if not await _wait_listening(options.host, port, task):
        return await proxy_failed(runtime, "http",
                                  f"Granian did not start listening on {options.host}:{port}")
    await runtime.call_controller("proxy_ready", "http", {"host": options.host, "port": port,
                                                          "pid": os.getpid(),
                                                          "server": "granian"})
    await stop.wait()
    server.stop()
    try:
        await asyncio.wait_for(task, 10)
    except (asyncio.TimeoutError, Exception):
        task.cancel()
    return 0


async def _wait_listening(host: str, port: int, task: asyncio.Task[Any]) -> bool:
    """Connect until the server accepts (Granian has no 'started' signal)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline and not task.done():
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return True
        await asyncio.sleep(0.01)
    return False
