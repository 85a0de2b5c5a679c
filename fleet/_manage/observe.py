"""The management server's observation routes: metrics, logs and the live top table.

``routes(controller)`` returns Starlette routes whose handlers read the Controller
object directly (they run on the instance's loop, beside it): ``/metrics``
(Prometheus text), ``/api/metrics``, ``/api/metrics/series``, ``/api/logs``,
``/api/logs/stream`` (server-sent events) and ``/api/top``. Bad query parameters get
422 with ``{"error", "detail": [{"loc", "msg"}]}``; authentication is the server's.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fleet import _logs

if TYPE_CHECKING:
    from fleet._controller.controller import Controller

# Metric labels a series query may filter on.
LABELS = ("application", "deployment", "replica", "route", "method", "status_code", "state")
MAX_WINDOW_S = 86400.0
# How often a log stream looks for new lines, and how long it may stay open.
FOLLOW_POLL_S = 0.5
FOLLOW_MAX_S = 3600.0


class _Invalid(Exception):
    def __init__(self, loc: str, msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


def _invalid(exc: _Invalid) -> JSONResponse:
    return JSONResponse({"error": f"query parameter {exc.loc!r}: {exc.msg}",
                         "detail": [{"loc": ["query", exc.loc], "msg": exc.msg}]},
                        status_code=422)


def _number(request: Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _Invalid(name, f"expected a number, got {raw!r}") from None
    if not low <= value <= high:
        raise _Invalid(name, f"expected a number from {low:g} to {high:g}, got {raw}")
    return value


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "0").lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no", ""):
        return False
    raise _Invalid(name, f"expected 0 or 1, got {raw!r}")


def _log_query(request: Request) -> dict[str, Any]:
    q = request.query_params
    since = q.get("since")
    seconds = None
    if since:
        try:
            seconds = _logs.parse_since(since)
        except ValueError as exc:
            raise _Invalid("since", str(exc)) from None
    return {"application": q.get("application") or None,
            "deployment": q.get("deployment") or None,
            "replica": q.get("replica") or None,
            "system": _flag(request, "system"),
            "since": seconds, "grep": q.get("grep") or None,
            "request_id": q.get("request_id") or None}


def routes(controller: Controller) -> list[Route]:
    """The observation routes over one instance's controller."""

    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(controller.metrics.prometheus(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def metric_names(request: Request) -> Response:
        return JSONResponse({"metrics": controller.metrics.names()})

    async def series(request: Request) -> Response:
        try:
            name = request.query_params.get("name", "")
            if not name:
                raise _Invalid("name", "required: a metric name from /api/metrics")
            window = _number(request, "window", 900.0, 1.0, MAX_WINDOW_S)
            rate = _flag(request, "rate")
            quantile = None
            if request.query_params.get("quantile"):
                quantile = _number(request, "quantile", 0.5, 0.0, 1.0)
        except _Invalid as exc:
            return _invalid(exc)
        match = {k: v for k in LABELS if (v := request.query_params.get(k))}
        return JSONResponse(controller.metrics.series(name, match, window, rate, quantile))

    async def top(request: Request) -> Response:
        try:
            window = _number(request, "window", 60.0, 1.0, MAX_WINDOW_S)
        except _Invalid as exc:
            return _invalid(exc)
        return JSONResponse({"window_s": window, "rows": controller.top(window)})

    async def logs(request: Request) -> Response:
        try:
            query = _log_query(request)
            limit = int(_number(request, "limit", 1000, 1, _logs.MAX_LIMIT))
        except _Invalid as exc:
            return _invalid(exc)
        if not controller.logs_dir:
            return JSONResponse({"lines": []})
        lines = await asyncio.get_running_loop().run_in_executor(
            None, lambda: _logs.read(controller.logs_dir, limit=limit, **query))
        return JSONResponse({"lines": lines})

    async def logs_stream(request: Request) -> Response:
        try:
            query = _log_query(request)
        except _Invalid as exc:
            return _invalid(exc)
        query.pop("since")
        directory = controller.logs_dir
        loop = asyncio.get_running_loop()
        tail = None
        if directory and os.path.isdir(directory):
            tail = _logs.follow(directory, **query)
            # where the files end now, before the client gets the headers: every line
            # written after that is sent
            await loop.run_in_executor(None, next, tail)

        async def events() -> AsyncIterator[str]:
            if tail is None:
                return
            deadline = loop.time() + FOLLOW_MAX_S
            while loop.time() < deadline:
                batch = await loop.run_in_executor(None, next, tail)
                for line in batch:
                    yield f"data: {json.dumps(line)}\n\n"
                if not batch:
                    yield ": keep-alive\n\n"
                await asyncio.sleep(FOLLOW_POLL_S)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    return [Route("/metrics", metrics_text, methods=["GET"]),
            Route("/api/metrics", metric_names, methods=["GET"]),
            Route("/api/metrics/series", series, methods=["GET"]),
            Route("/api/top", top, methods=["GET"]),
            Route("/api/logs", logs, methods=["GET"]),
            Route("/api/logs/stream", logs_stream, methods=["GET"])]
