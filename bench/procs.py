"""Process helpers: free ports, server subprocesses, process-tree CPU and memory.

Every server the harness starts runs in its own session (process group), so that
stopping it can signal the whole group; descendants that left the group are
found through psutil and killed as well.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


_LOGS_DIR = os.path.join(tempfile.gettempdir(), f"fleet-bench-logs-{os.getpid()}")
atexit.register(shutil.rmtree, _LOGS_DIR, True)


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for benchmark subprocesses: repo on the path, Ray on loopback."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    # Makes Ray use 127.0.0.1 as its node address instead of the routed interface.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    # fleet's log files of every benchmark server go to one temporary directory, not
    # the user's ~/.local/state (FLEET_LOGS_DIR set by the caller wins)
    env.setdefault("FLEET_LOGS_DIR", _LOGS_DIR)
    if extra:
        env.update(extra)
    return env


def _tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and all of its live descendants."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by ``pid`` and its descendants."""
    total = 0.0
    for proc in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def _role(proc: psutil.Process) -> str:
    """Which part of fleet a process is, from its command line (``other`` elsewhere)."""
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        cmdline = proc.cmdline()
        if "fleet._proxy" in cmdline:
            return "proxy"
        if "fleet._replica" in cmdline:
            return "replica"
    return "driver"


def tree_cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds used so far by ``pid``'s tree, summed per role (driver, proxy,
    replica); a tree that is not fleet's counts as its driver."""
    out = {"driver": 0.0, "proxy": 0.0, "replica": 0.0}
    for proc in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            out[_role(proc)] += times.user + times.system
    return out


def tree_memory(pid: int) -> dict[str, float]:
    """RSS and PSS (MiB) summed over ``pid`` and its descendants, with the count."""
    rss = pss = 0.0
    count = 0
    for proc in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            rss += proc.memory_info().rss
            count += 1
            with contextlib.suppress(psutil.AccessDenied, AttributeError):
                pss += getattr(proc.memory_full_info(), "pss", 0.0)
    mib = 1024.0 * 1024.0
    return {"rss_mib": rss / mib, "pss_mib": pss / mib, "processes": float(count)}


def kill_tree(pid: int, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop ``pid``'s process group and every descendant; SIGKILL what outlives grace."""
    procs = _tree(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.pid == pid:
                proc.send_signal(sig)
    _, alive = psutil.wait_procs(procs[:1], timeout=grace_s)
    procs = [p for p in procs if p.is_running()] + _tree(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)


@dataclass
class ServerProcess:
    """A server subprocess that prints ``READY <json>`` once it serves.

    Use as a context manager; leaving the block stops the whole process tree.
    """

    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=bench_env)
    ready_timeout_s: float = 180.0
    stop_signal: int = signal.SIGTERM
    info: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)
    _log: Any = None

    def start(self) -> ServerProcess:
        """Launch the subprocess and wait for its READY line."""
        self._log = tempfile.NamedTemporaryFile(
            "w+", prefix="bench-server-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            list(self.argv),
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready in {self.ready_timeout_s}s: {self.tail()}")
        return self

    def _pump(self) -> None:
        """Read stdout until EOF, noting the READY line."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("READY") and not self._ready.is_set():
                payload = line[len("READY") :].strip()
                if payload:
                    with contextlib.suppress(json.JSONDecodeError):
                        self.info = json.loads(payload)
                self._ready.set()

    @property
    def pid(self) -> int:
        """Process id of the server's root process."""
        assert self.proc is not None
        return self.proc.pid

    def json_lines(self, prefix: str = "RESULT") -> list[dict[str, Any]]:
        """Payloads of stdout lines of the form ``<prefix> <json>``."""
        out = []
        for line in list(self.lines):
            if line.startswith(prefix + " "):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line[len(prefix) + 1 :]))
        return out

    def wait(self, timeout_s: float) -> int | None:
        """Wait for the process to exit; returns its code or None on timeout."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, n: int = 30) -> str:
        """Last lines of the server's stderr, for error messages."""
        if self._log is None:
            return ""
        self._log.flush()
        text = Path(self._log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-n:])

    def stop(self) -> None:
        """Stop the process tree and remove the log file."""
        if self.proc is not None:
            kill_tree(self.proc.pid, sig=self.stop_signal)
            with contextlib.suppress(Exception):
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            with contextlib.suppress(OSError):
                os.unlink(self._log.name)
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python_module(module: str, *args: str) -> list[str]:
    """argv running ``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@contextlib.contextmanager
def cpu_window(pid: int) -> Iterator[dict[str, float]]:
    """Measure process-tree CPU seconds of ``pid`` across the ``with`` block."""
    out: dict[str, float] = {}
    roles = tree_cpu_by_role(pid)
    before = tree_cpu_seconds(pid)
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["cpu_s"] = tree_cpu_seconds(pid) - before
        out["wall_s"] = time.perf_counter() - t0
        for role, cpu_s in tree_cpu_by_role(pid).items():
            out[f"cpu_{role}_s"] = cpu_s - roles[role]   # per process kind, for fleet
