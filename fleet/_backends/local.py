"""The local backend: every replica is a child process on this machine."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
from typing import Any

from fleet._backends.lifeline import Lifeline
from fleet._types import ReplicaSpec


class LocalProcess:
    """A child process started by the local backend."""

    def __init__(self, replica_id: str, popen: subprocess.Popen[bytes]) -> None:
        self.replica_id = replica_id
        self.popen = popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def node_id(self) -> str:
        return "local"

    def pending(self) -> str | None:
        return None

    def exit_code(self) -> int | None:
        return self.popen.poll()


class LocalBackend:
    """Starts replicas (and the proxy) as ``python -m`` child processes."""

    name = "local"
    listen_host = ""

    def __init__(self) -> None:
        self.procs: dict[str, LocalProcess] = {}
        self.lifeline = Lifeline()      # children die with this process

    def spawn(self, key: str, module: str, payload: Any,
              fds: tuple[int, ...] = ()) -> LocalProcess:
        """Start ``python -m module``, handing it payload pickled on stdin and the file
        descriptors fds."""
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        popen = subprocess.Popen([sys.executable, "-m", module, *self.lifeline.child_args()],
                                 stdin=subprocess.PIPE, env=env, close_fds=True,
                                 pass_fds=(self.lifeline.read_fd, *fds))
        assert popen.stdin is not None
        popen.stdin.write(pickle.dumps(payload, 5))
        popen.stdin.close()
        proc = LocalProcess(key, popen)
        self.procs[key] = proc
        return proc

    async def start_replica(self, spec: ReplicaSpec) -> LocalProcess:
        return self.spawn(spec.replica_id, "fleet._replica", spec)

    async def stop_replica(self, proc: Any, timeout_s: float) -> None:
        assert isinstance(proc, LocalProcess)
        # Polling, not a waiter thread: this also runs from atexit, when executors
        # no longer take work.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay = 0.002
        while proc.popen.poll() is None:
            if loop.time() > deadline:
                self.kill(proc)
                deadline = loop.time() + 5
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        self.procs.pop(proc.replica_id, None)

    def kill(self, proc: Any) -> None:
        assert isinstance(proc, LocalProcess)
        if proc.alive():
            try:
                proc.popen.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    def terminate(self, proc: Any) -> None:
        assert isinstance(proc, LocalProcess)
        if proc.alive():
            try:
                proc.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def nodes(self) -> list[dict[str, Any]]:
        return [{"node_id": "local", "address": "127.0.0.1", "cpus": os.cpu_count() or 1}]

    def alive(self, proc: Any) -> bool:
        return bool(proc.alive())

    async def shutdown(self) -> None:
        for proc in list(self.procs.values()):
            self.terminate(proc)
        for proc in list(self.procs.values()):
            try:
                await self.stop_replica(proc, 5.0)
            except Exception:
                self.kill(proc)
        self.procs.clear()

    def publish(self, info: dict[str, Any]) -> str | None:
        """Nothing to do: the instance file on this machine is how others find it."""
        return None

    def kill_all(self) -> None:
        """Last resort at interpreter exit: nothing is left behind."""
        for proc in list(self.procs.values()):
            self.kill(proc)
            try:
                proc.popen.wait(2)
            except Exception:
                pass
        self.lifeline.close()
