"""Replica process entry: read the spec from stdin, start the loop, serve until told."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import sys

from fleet._backends import lifeline
from fleet._logformat import DATEFMT, log_format
from fleet._types import ProcessRole, ReplicaSpec


def _setup_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.new_event_loop()


def main() -> None:
    lifeline.hold(sys.argv)
    ProcessRole.replica = True         # before any user code is imported
    spec: ReplicaSpec = pickle.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    for p in reversed(spec.sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    if spec.cwd:
        try:
            os.chdir(spec.cwd)
        except OSError:
            pass
    logging.basicConfig(level=logging.INFO, datefmt=DATEFMT,
                        format=log_format(f"{spec.deployment_name} {spec.replica_id}"))
    # The controller decides when replicas stop; Ctrl-C in a terminal reaches the
    # whole process group, and the driver shuts replicas down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = _setup_loop()
    asyncio.set_event_loop(loop)
    from fleet._replica.replica import Replica
    replica = Replica(spec, loop)
    loop.add_signal_handler(signal.SIGTERM, replica.request_stop)
    try:
        code = loop.run_until_complete(replica.run())
    finally:
        try:
            loop.close()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
