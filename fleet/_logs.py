"""Log files: every process of an instance writes JSON lines under one directory.

``$XDG_STATE_HOME/fleet/logs/<instance>/`` (else ``~/.local/state/fleet/logs/<instance>/``;
``FLEET_LOGS_DIR`` overrides the part before ``<instance>``): ``controller.log`` (the
driver: controller and instance), ``proxy-<kind>-<index>.log``, and
``replica-<application>-<replica id>.log``. Each file rotates at ROTATE_BYTES, keeping
BACKUPS older files. A line holds ``time`` (Unix seconds), ``timestamp`` (ISO 8601, UTC),
``level``, ``application``, ``deployment``, ``replica``, ``request_id``, ``logger``,
``message``. A replica's or proxy's stdout and stderr go there too (logger ``stdout`` /
``stderr``), besides the console, which keeps the readable lines.

:func:`read` and :func:`follow` are what ``fleet logs`` and ``/api/logs`` use.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from fleet._context import current_request_id

ROTATE_BYTES = 20 * 1024 * 1024
BACKUPS = 4
# A line longer than this is cut (one print of a huge object must not make a huge line).
MAX_LINE = 64 * 1024
# lines a read returns at most
MAX_LIMIT = 10000


def base_dir() -> str:
    """Where instances' log directories live."""
    override = os.environ.get("FLEET_LOGS_DIR")
    if override:
        return override
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                              ".local", "state")
    return os.path.join(state, "fleet", "logs")


def instance_dir(instance: str, logs_dir: str | None = None) -> str:
    return os.path.join(logs_dir or base_dir(), instance)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the process' application, deployment and
    replica and the request being served."""

    def __init__(self, who: dict[str, str]) -> None:
        super().__init__()
        self.who = who

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        rid = getattr(record, "request_id", None) or current_request_id()
        if isinstance(rid, bytes):
            rid = rid.decode("latin-1")
        line = {"time": round(record.created, 6),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname, **self.who, "request_id": rid or "",
                "logger": record.name, "message": message[:MAX_LINE]}
        return json.dumps(line, ensure_ascii=False)


class _Tee:
    """A text stream that also sends each complete line to the log file."""

    def __init__(self, stream: Any, handler: logging.Handler, name: str) -> None:
        self.stream = stream
        self.handler = handler
        self.name = name
        self.partial = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        with self.lock:
            data = self.partial + text
            lines = data.split("\n")
            self.partial = lines.pop()[:MAX_LINE]
        for line in lines:
            if line:
                record = logging.LogRecord(self.name, logging.INFO, "", 0, line, None, None)
                self.handler.handle(record)
        return n

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def setup(directory: str, filename: str, application: str = "", deployment: str = "",
          replica: str = "", capture_output: bool = False, logger: str = ""
          ) -> logging.Handler | None:
    """Send this process's log records (and, with capture_output, its stdout and stderr)
    to directory/filename as JSON lines. Returns the handler, or None when the
    directory cannot be made (a warning says so; the console keeps everything)."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            os.path.join(directory, filename), maxBytes=ROTATE_BYTES, backupCount=BACKUPS,
            encoding="utf-8")
    except OSError as exc:
        logging.getLogger("fleet").warning("cannot write log files under %s: %s; logs go "
                                           "to the console only", directory, exc)
        return None
    handler.setFormatter(JsonFormatter({"application": application,
                                        "deployment": deployment, "replica": replica}))
    logging.getLogger(logger or None).addHandler(handler)
    if capture_output:
        # the console handlers keep the original streams: nothing is written twice
        sys.stdout = _Tee(sys.stdout, handler, "stdout")  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, handler, "stderr")  # type: ignore[assignment]
    return handler


# -- reading ------------------------------------------------------------------------
_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_since(text: str) -> float:
    """'90', '90s', '10m', '2h', '1d' -> seconds; ValueError saying what is accepted."""
    m = _SINCE.match(text or "")
    if m is None:
        raise ValueError(f"--since takes a number of seconds, or one with s, m, h or d "
                         f"(10m, 2h), not {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _files(directory: str, system: bool) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for name in names:
        base = name.split(".log")[0]
        is_system = base == "controller" or base.startswith("proxy-")
        if ".log" in name and is_system == system:
            out.append(os.path.join(directory, name))
    return sorted(out)


def matches(line: dict[str, Any], application: str | None, deployment: str | None,
            replica: str | None, since_t: float | None, grep: str | None,
            request_id: str | None) -> bool:
    if application and line.get("application") != application:
        return False
    if deployment and line.get("deployment") != deployment:
        return False
    if replica and line.get("replica") != replica:
        return False
    if since_t is not None and float(line.get("time", 0)) < since_t:
        return False
    if request_id and line.get("request_id") != request_id \
            and request_id not in str(line.get("message", "")):
        return False
    return not (grep and grep not in str(line.get("message", "")))


def _parse(raw: str) -> dict[str, Any] | None:
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    return line if isinstance(line, dict) else None


def read(directory: str, application: str | None = None, deployment: str | None = None,
         replica: str | None = None, system: bool = False, since: float | None = None,
         grep: str | None = None, request_id: str | None = None, limit: int = 1000
         ) -> list[dict[str, Any]]:
    """The last limit lines that match, oldest first, from every file (rotated ones
    included) of the instance's log directory."""
    limit = max(1, min(int(limit), MAX_LIMIT))
    since_t = time.time() - since if since is not None else None
    found: list[dict[str, Any]] = []
    for path in _files(directory, system):
        kept: deque[dict[str, Any]] = deque(maxlen=limit)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for raw in f:
                    line = _parse(raw)
                    if line is not None and matches(line, application, deployment, replica,
                                                     since_t, grep, request_id):
                        kept.append(line)
        except OSError:
            continue
        found.extend(kept)
    found.sort(key=lambda ln: float(ln.get("time", 0)))
    return found[-limit:]


def follow(directory: str, application: str | None = None, deployment: str | None = None,
           replica: str | None = None, system: bool = False, grep: str | None = None,
           request_id: str | None = None) -> Iterator[list[dict[str, Any]]]:
    """New matching lines as they are written: each next() gives what was added since
    the last one (possibly nothing); the caller paces the calls."""
    offsets: dict[str, int] = {}
    for path in _files(directory, system):
        try:
            offsets[path] = os.path.getsize(path)
        except OSError:
            pass
    while True:
        batch: list[dict[str, Any]] = []
        for path in _files(directory, system):
            if path.endswith(".log") is False:
                continue                # rotated files are older
            try:
                size = os.path.getsize(path)
            except OSError:
                continue
            start = offsets.get(path, 0)
            if size < start:
                start = 0               # rotated: the file started again
            if size == start:
                continue
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(size - start)
            except OSError:
                continue
            complete = data.rfind(b"\n") + 1
            offsets[path] = start + complete
            for raw in data[:complete].decode("utf-8", "replace").splitlines():
                line = _parse(raw)
                if line is not None and matches(line, application, deployment, replica,
                                                 None, grep, request_id):
                    batch.append(line)
        batch.sort(key=lambda ln: float(ln.get("time", 0)))
        yield batch
