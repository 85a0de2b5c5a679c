"""What every proxy server needs to start: its listening socket, and how to tell the
controller it cannot serve. The servers (http, grpc, granian) import it; the process
entry (process.py) imports the servers, never the other way round."""

from __future__ import annotations

import errno
import socket

from fleet._runtime import Runtime


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def cannot_listen(kind: str, host: str, port: int, exc: OSError) -> str:
    """The one line for a proxy whose address cannot be bound: what, where, what to do."""
    hint = "; stop what uses it or pick another port (0 picks a free one)" \
        if exc.errno == errno.EADDRINUSE else ""
    return f"the {kind} proxy cannot listen on {host}:{port}: {exc}{hint}"


async def proxy_failed(runtime: Runtime, kind: str, message: str, index: int = 0) -> int:
    """Tell the controller this proxy (the index-th of its kind) cannot serve
    (fleet.start raises with message); returns the process's exit code."""
    await runtime.call_controller("proxy_ready", kind, {"error": message, "index": index})
    return 1
