"""Log files: every process of an instance writes JSON lines under one directory.

``$XDG_STATE_HOME/fleet/logs/<instance>/`` (else ``~/.local/state/fleet/logs/<instance>/``;
``FLEET_LOGS_DIR`` overrides the part before ``<instance>``): ``controller.log`` (the
driver: controller and instance), ``proxy-<kind>-<index>.log``, and
``replica-<application>-<replica id>.log``. Each file rotates at ROTATE_BYTES, keeping
BACKUPS older files (``.1`` the newest); lines are appended with one ``os.write`` per
batch, the proxies' access log once per loop iteration as before. A line holds
``time`` (Unix seconds), ``timestamp`` (ISO 8601, UTC), ``level``, ``application``,
``deployment``, ``replica``, ``request_id``, ``trace_id``, ``logger``, ``message``.
A replica's or proxy's stdout and stderr go there too (logger ``stdout`` / ``stderr``),
besides the console, which keeps the readable lines.

:func:`read` and :func:`follow` are what ``fleet logs`` and ``/api/logs`` use.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

from fleet._context import current_request_id, trace_id

ROTATE_BYTES = 20 * 1024 * 1024
BACKUPS = 4
# Lines of stdout/stderr (the access log, prints) wait at most this long in memory
# before they are written, or until BUFFER_BYTES of them wait.
FLUSH_S = 0.2
BUFFER_BYTES = 64 * 1024
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
                "timestamp": _stamp(record.created),
                "level": record.levelname, **self.who, "request_id": rid or "",
                "trace_id": trace_id(),
                "logger": record.name, "message": message[:MAX_LINE]}
        return json.dumps(line, ensure_ascii=False)


_second = [-1, ""]


def _stamp(now: float) -> str:
    """ISO 8601 UTC with milliseconds; the part up to the second made once a second."""
    sec = int(now)
    if sec != _second[0]:
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second[0] = sec
    return f"{_second[1]}.{int(now * 1000) % 1000:03d}Z"


_sinks: weakref.WeakSet[Sink] = weakref.WeakSet()
_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()


def _flush_loop() -> None:
    while True:
        time.sleep(FLUSH_S)
        flush_all()


def flush_all() -> None:
    """Write what every log file of this process holds in memory (a process calls it
    before it exits)."""
    for sink in list(_sinks):
        sink.flush()


class Sink:
    """One log file, appended to with one ``os.write`` per batch of lines (no seek, no
    tell: the size is counted here), rotated at ROTATE_BYTES into ``.1`` ... ``.BACKUPS``.

    :meth:`write` writes at once (log records: rare, and wanted even if the process
    dies next); :meth:`add` keeps lines in memory for at most FLUSH_S (stdout and
    stderr, where the access log's lines go: one write per batch, not per loop
    iteration)."""

    def __init__(self, path: str) -> None:
        global _flusher
        self.path = path
        self.lock = threading.Lock()
        self.fd = self._open()
        self.size = os.fstat(self.fd).st_size
        self.pending: list[str] = []
        self.pending_chars = 0
        _sinks.add(self)
        with _flusher_lock:
            if _flusher is None:
                _flusher = threading.Thread(target=_flush_loop, name="fleet-log-flush",
                                            daemon=True)
                _flusher.start()

    def add(self, text: str) -> None:
        """Keep text to write with the next flush (at most FLUSH_S from now)."""
        with self.lock:
            self.pending.append(text)
            self.pending_chars += len(text)
            if self.pending_chars < BUFFER_BYTES:
                return
        self.flush()

    def flush(self) -> None:
        with self.lock:
            if not self.pending:
                return
            text = "".join(self.pending)
            self.pending.clear()
            self.pending_chars = 0
            self._write(text)

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                       0o600)

    def write(self, text: str) -> None:
        """Write text now (after whatever waits in memory, so lines keep their order)."""
        with self.lock:
            if self.pending:
                text = "".join(self.pending) + text
                self.pending.clear()
                self.pending_chars = 0
            self._write(text)

    def _write(self, text: str) -> None:
        """Append text (the lock is held)."""
        if self.fd < 0:
            return          # closed
        data = text.encode("utf-8", "replace")
        try:
            os.write(self.fd, data)
        except OSError:
            return          # a full disk must not break the process that logs
        self.size += len(data)
        if self.size >= ROTATE_BYTES:
            self._rotate()

    def _rotate(self) -> None:
        os.close(self.fd)
        for i in range(BACKUPS - 1, 0, -1):
            older = f"{self.path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{i + 1}")
        try:
            os.replace(self.path, f"{self.path}.1")
        except OSError:
            pass
        self.fd = self._open()
        self.size = 0

    def close(self) -> None:
        """Write what waits and close the file (once: a closed descriptor's number may
        belong to another file later, so it is never closed or written again)."""
        self.flush()
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class SinkHandler(logging.Handler):
    """A logging handler writing JSON lines to a :class:`Sink`."""

    def __init__(self, sink: Sink, who: dict[str, str]) -> None:
        super().__init__()
        self.sink = sink
        self.setFormatter(JsonFormatter(who))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write(self.format(record) + "\n")
        except Exception:   # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)

    def close(self) -> None:
        # logging.shutdown() and logging.config.dictConfig() (uvicorn calls it in the
        # process that serves the management API) close every handler: the file stays
        # open, so the instance's lines keep coming; close_file() closes it.
        super().close()

    def close_file(self) -> None:
        """Close the file for good (the instance stopped)."""
        super().close()
        self.sink.close()


_encode = json.encoder.encode_basestring  # type: ignore[attr-defined]


def encode(text: str) -> str:
    """text as a JSON string literal (quotes included)."""
    return str(_encode(text))


def json_head(now: float, logger: str) -> str:
    """The start of a JSON line written at now by logger (time, timestamp, level,
    logger); the caller adds the rest and the closing brace."""
    return (f'{{"time": {now:.6f}, "timestamp": "{_stamp(now)}", "level": "INFO", '
            f'"logger": {_encode(logger)}')


class Tee:
    """A text stream that also sends each complete line to the log file: the lines of
    one write go out as one ``os.write`` (the access log writes once per loop
    iteration), each a JSON line built with one C string encoder."""

    def __init__(self, stream: Any, sink: Sink, name: str, who: dict[str, str]) -> None:
        self.stream = stream
        self.sink = sink
        self.partial = ""
        self.lock = threading.Lock()
        self.head = "".join(f", {_encode(k)}: {_encode(v)}" for k, v in who.items()) \
            + f', "logger": {_encode(name)}'

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        with self.lock:
            data = self.partial + text
            lines = data.split("\n")
            self.partial = lines.pop()[:MAX_LINE]
        lines = [ln for ln in lines if ln]
        if lines:
            now = time.time()
            stamp = _stamp(now)
            rid = current_request_id()
            if isinstance(rid, bytes):
                rid = rid.decode("latin-1")
            start = (f'{{"time": {now:.6f}, "timestamp": "{stamp}", "level": "INFO"'
                     f'{self.head}, "request_id": {_encode(rid or "")}, '
                     f'"trace_id": "{trace_id()}", "message": ')
            self.sink.add("".join(f"{start}{_encode(ln[:MAX_LINE])}}}\n" for ln in lines))
        return n

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def setup(directory: str, filename: str, application: str = "", deployment: str = "",
          replica: str = "", capture_output: bool = False, logger: str = ""
          ) -> SinkHandler | None:
    """Send this process's log records (and, with capture_output, its stdout and stderr)
    to directory/filename as JSON lines. Returns the handler, or None when the
    directory cannot be made (a warning says so; the console keeps everything)."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        sink = Sink(os.path.join(directory, filename))
    except OSError as exc:
        logging.getLogger("fleet").warning("cannot write log files under %s: %s; logs go "
                                           "to the console only", directory, exc)
        return None
    who = {"application": application, "deployment": deployment, "replica": replica}
    handler = SinkHandler(sink, who)
    logging.getLogger(logger or None).addHandler(handler)
    if capture_output:
        # the console handlers keep the original streams: nothing is written twice
        sys.stdout = Tee(sys.stdout, sink, "stdout", who)  # type: ignore[assignment]
        sys.stderr = Tee(sys.stderr, sink, "stderr", who)  # type: ignore[assignment]
    return handler


def apply(config: dict[str, Any] | None, who: dict[str, str]) -> None:
    """Apply a logging_config (as a dict) to this process: the root logger's level, and
    the console's encoding (TEXT: its readable lines; JSON: the files' lines)."""
    config = config or {}
    root = logging.getLogger()
    root.setLevel(str(config.get("log_level") or "INFO"))
    json_console = config.get("encoding") == "JSON"
    for handler in root.handlers:
        if not isinstance(handler, logging.StreamHandler) \
                or isinstance(handler, logging.FileHandler):
            continue
        text = getattr(handler, "_fleet_text", None)
        if text is None:
            text = handler.formatter
            handler._fleet_text = text  # type: ignore[attr-defined]
        handler.setFormatter(JsonFormatter(who) if json_console else text)


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

    def age(path: str) -> tuple[str, int]:     # a file's backups first, oldest first
        base, _, n = path.rpartition(".log")
        return base, -int(n[1:]) if n[1:].isdigit() else 0
    return sorted(out, key=age)


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
