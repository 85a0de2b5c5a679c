"""Proxy process entry: read the bootstrap from stdin, serve until the instance ends."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle

from fleet._backends import lifeline
from fleet._logformat import DATEFMT, log_format
from fleet._runtime import Runtime, set_current
from fleet.exceptions import FleetError


def main() -> None:
    lifeline.hold(sys.argv)
    boot: dict[str, Any] = pickle.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    for p in reversed(boot.get("sys_path", [])):
        if p not in sys.path:
            sys.path.insert(0, p)
    logging.basicConfig(level=logging.INFO, datefmt=DATEFMT, format=log_format("proxy"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    kind = boot["kind"]
    if boot.get("logs_dir"):
        from fleet import _logs
        _logs.setup(boot["logs_dir"], f"proxy-{kind}-{boot.get('index', 0)}.log",
                    capture_output=True)
    if boot.get("logging_config"):
        from fleet import _logs
        _logs.apply(boot["logging_config"], {"application": "", "deployment": "",
                                             "replica": f"proxy-{kind}-{boot.get('index', 0)}"})
    try:
        import uvloop
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    if boot.get("logs_dir"):
        from fleet import _logs
        _logs.attach_loop(loop)         # output lines are written by a timer on it
    try:
        code = loop.run_until_complete(_serve(kind, boot, loop))
    except (FleetError, ConnectionError):
        # the instance went away while this proxy started (its driver stopped at once:
        # a bad application, say): nothing to serve, nothing to report
        code = 1
    sys.stderr.flush()
    if boot.get("logs_dir"):
        from fleet import _logs
        _logs.flush_all()
    from fleet import _otel
    _otel.flush()
    os._exit(code)


async def _serve(kind: str, boot: dict[str, Any], loop: asyncio.AbstractEventLoop,
                 stop: asyncio.Event | None = None,
                 setup: Callable[[Runtime], None] | None = None) -> int:
    """Serve as the proxy boot describes until stop is set (by SIGTERM when not given:
    a proxy process of its own; a Ray actor passes the event it sets, and setup, which
    sees the runtime before it connects)."""
    runtime = Runtime(loop, boot["controller_address"], boot["secret"])
    runtime.ack_tables = True
    if setup is not None:
        setup(runtime)
    set_current(runtime)
    if stop is None:
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    runtime.on_controller_lost = stop.set
    await runtime.connect_controller(subscribe=True)
    options = cloudpickle.loads(boot["options"])
    if kind == "http":
        from fleet._proxy.http import serve_http
        fd = boot.get("listen_fd")
        shared = None if fd is None else socket.socket(fileno=fd)
        return await serve_http(runtime, options, stop, shared, boot.get("index", 0))
    from fleet._proxy.grpc import serve_grpc  # type: ignore[import-not-found]
    return int(await serve_grpc(runtime, options, stop, boot.get("shared", False),
                                boot.get("index", 0)))
