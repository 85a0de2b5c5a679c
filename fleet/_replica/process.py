"""Replica process entry: read the spec from stdin, start the loop, serve until told."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import sys
from collections.abc import Callable
from typing import Any

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
    logging.basicConfig(level=logging.INFO, datefmt=DATEFMT,
                        format=log_format(f"{spec.app_name}/{spec.deployment_name} "
                                          f"{spec.replica_id}"))
    if spec.logs_dir:
        from fleet import _logs
        _logs.setup(spec.logs_dir, f"replica-{spec.app_name}-{spec.replica_id}.log",
                    spec.app_name, spec.deployment_name, spec.replica_id,
                    capture_output=True)
    # The controller decides when replicas stop; Ctrl-C in a terminal reaches the
    # whole process group, and the driver shuts replicas down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = serve(spec, lambda replica, loop: loop.add_signal_handler(signal.SIGTERM,
                                                                     replica.request_stop))
    sys.stdout.flush()
    sys.stderr.flush()
    if spec.logs_dir:
        from fleet import _logs
        _logs.flush_all()
    from fleet import _otel
    _otel.flush()
    os._exit(code)


def serve(spec: ReplicaSpec, started: Callable[[Any, asyncio.AbstractEventLoop], None],
          chdir: bool = True) -> int:
    """Run one replica on a new event loop in this thread until it stops; returns its exit
    code. started(replica, loop) is called once the replica exists (to wire its stop).
    A process of the local backend runs it on its main thread, a Ray actor on a thread
    of its own."""
    for p in reversed(spec.sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    if spec.cwd and chdir:
        try:
            os.chdir(spec.cwd)
        except OSError:
            pass
    loop = _setup_loop()
    asyncio.set_event_loop(loop)
    if spec.logs_dir:
        from fleet import _logs
        _logs.attach_loop(loop)         # output lines are written by a timer on it
    from fleet._replica.replica import Replica
    replica = Replica(spec, loop)
    replica.apply_logging(spec.config.get("logging_config"))
    started(replica, loop)
    try:
        return loop.run_until_complete(replica.run())
    finally:
        try:
            loop.close()
        except Exception:
            pass
