"""The one timestamp format of every log line fleet writes (replicas, proxies, the
access log, the ``fleet run`` driver): ``2026-12-07 04:01:54.123``, local time."""

from __future__ import annotations

import time

DATEFMT = "%Y-%m-%d %H:%M:%S"


def log_format(who: str) -> str:
    """A logging format for lines of one process: time, level, who, logger, message."""
    return f"%(asctime)s.%(msecs)03d %(levelname)s {who} %(name)s: %(message)s"


def stamp(now: float) -> str:
    """now (time.time()) as the log lines' timestamp."""
    return f"{time.strftime(DATEFMT, time.localtime(now))}.{int(now * 1000) % 1000:03d}"
