"""Where a request's error goes when its client gets only an id: the proxy's log (every
one) and the controller, whose ``fleet status`` shows each deployment's last one."""

from __future__ import annotations

import logging
import time

from fleet._runtime import Runtime
from fleet._types import RequestErrorMsg

log = logging.getLogger("fleet.proxy")

# At most one report per deployment this often: an error storm must not load the
# controller (the log still has every error).
REPORT_EVERY_S = 1.0
_MAX_KEYS = 4096


class ErrorReports:
    """Logs request errors with their ids and reports them to the controller: at once,
    or, within REPORT_EVERY_S of the last report for that deployment, the latest one at
    the end of that time (one pending report per deployment at most)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._last: dict[tuple[str, str], float] = {}
        self._pending: dict[tuple[str, str], RequestErrorMsg] = {}

    def failed(self, what: str, rid: str, app: str, deployment: str, replica: str,
               exc: BaseException) -> None:
        """Record that request rid (an HTTP request or a gRPC call: what) failed."""
        name = getattr(exc, "error_type", "") or type(exc).__name__
        tb = getattr(exc, "remote_traceback", "") or ""
        log.error("%s %s failed (app %s, deployment %s, replica %s): %s: %s%s", what, rid,
                  app, deployment, replica, name, exc, f"\n{tb}" if tb else "")
        msg: RequestErrorMsg = {"type": "request_error", "app": app, "deployment": deployment,
               "request_id": rid, "error": f"{name}: {exc}", "traceback": tb}
        key = (app, deployment)
        wait = self._last.get(key, -REPORT_EVERY_S) + REPORT_EVERY_S - time.monotonic()
        if wait <= 0:
            self._send(key, msg)
            return
        if key not in self._pending:
            self.runtime.loop.call_later(wait, self._flush, key)
        self._pending[key] = msg

    def _flush(self, key: tuple[str, str]) -> None:
        msg = self._pending.pop(key, None)
        if msg is not None:
            self._send(key, msg)

    def _send(self, key: tuple[str, str], msg: RequestErrorMsg) -> None:
        if len(self._last) >= _MAX_KEYS:
            self._last.clear()
        self._last[key] = time.monotonic()
        self.runtime.send_ctrl(msg)
