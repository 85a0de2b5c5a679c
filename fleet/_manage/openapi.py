"""The management API's OpenAPI 3.1 document (served at /api/openapi.json)."""

from __future__ import annotations

import copy
import functools
from typing import Any

from fleet._version import __version__

_ERROR = {"type": "object", "required": ["error", "request_id"],
          "properties": {"error": {"type": "string"}, "request_id": {"type": "string"},
                         "detail": {"type": "array", "items": {"type": "object"}}}}


def _json(schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"application/json": {"schema": schema or {"type": "object"}}}


def _responses(ok: str = "200", *codes: str, body: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    out: dict[str, Any] = {ok: {"description": "OK" if ok == "200" else "Accepted",
                                "content": _json(body)}}
    out["401"] = {"description": "missing or wrong token",
                  "content": _json({"$ref": "#/components/schemas/Error"})}
    for code in codes:
        out[code] = {"description": {"400": "bad request", "404": "not found",
                                     "409": "conflict", "412": "stale If-Match",
                                     "413": "body too large",
                                     "422": "invalid input"}[code],
                     "content": _json({"$ref": "#/components/schemas/Error"})}
    return out


_NAME = {"type": "string", "minLength": 1}


def _params(*names: str, query: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "schema": _NAME} for n in names] \
        + (query or [])


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": _json({"$ref": f"#/components/schemas/{ref}"})}


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def _observe_paths() -> dict[str, Any]:
    """Metrics, logs and top (fleet/_manage/observe.py)."""
    text = {"type": "string"}
    labels = [_query(k, text) for k in ("application", "deployment", "replica", "route",
                                        "method", "status_code", "state")]
    logs = [_query(k, text) for k in ("application", "deployment", "replica", "grep",
                                      "request_id")] + [
        _query("system", {"type": "string", "enum": ["0", "1"]}),
        _query("since", {"type": "string", "description": "seconds, or 90s, 10m, 2h, 1d"})]
    sse = {"200": {"description": "text/event-stream",
                   "content": {"text/event-stream": {"schema": text}}}}
    return {
        "/metrics": {"get": {
            "summary": "Every metric of the instance in Prometheus' text format.",
            "responses": {"200": {"description": "text/plain; version=0.0.4",
                                  "content": {"text/plain": {"schema": text}}},
                          **{k: v for k, v in _responses().items() if k != "200"}}}},
        "/api/metrics": {"get": {"summary": "The names of the metrics with a value.",
                                 "responses": _responses()}},
        "/api/metrics/series": {"get": {
            "summary": "A metric's history: 1 s points for 15 min, 10 s for 24 h; rate=1 "
                       "for a counter's per-second rate, quantile=q for a histogram's.",
            "parameters": [_query("name", {"type": "string"}, True), *labels,
                           _query("window", {"type": "number"}),
                           _query("rate", {"type": "string", "enum": ["0", "1"]}),
                           _query("quantile", {"type": "number"})],
            "responses": _responses("200", "422")}},
        "/api/top": {"get": {
            "summary": "Per deployment over the last window: requests/s, p50/p90/p99, "
                       "error rate, ongoing and queued calls, replicas.",
            "parameters": [_query("window", {"type": "number"})],
            "responses": _responses("200", "422")}},
        "/api/logs": {"get": {
            "summary": "Log lines of the instance's files, oldest first.",
            "parameters": [*logs, _query("limit", {"type": "integer"})],
            "responses": _responses("200", "422")}},
        "/api/logs/stream": {"get": {
            "summary": "New log lines as server-sent events, one JSON line per data: line.",
            "parameters": logs, "responses": sse}},
    }


@functools.lru_cache(maxsize=1)
def _spec() -> dict[str, Any]:
    from fleet._config import ApplicationConfig
    from fleet._manage.dashboard import PlaygroundRequest
    from fleet._manage.models import RollbackBody, ScaleBody
    schemas: dict[str, Any] = {"Error": _ERROR}
    for model in (ApplicationConfig, ScaleBody, RollbackBody, PlaygroundRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    app_d = ("app",)
    dep_d = ("app", "dep")
    paths: dict[str, Any] = {
        "/api/instance": {"get": {"summary": "The instance: pid, version, addresses.",
                                  "responses": _responses()}},
        "/api/instance/shutdown": {"post": {
            "summary": "Stop the instance and every process it started.",
            "responses": _responses("202", "409")}},
        "/api/applications": {"get": {"summary": "Every application's status.",
                                      "responses": _responses()}},
        "/api/applications/{app}": {
            "parameters": _params(*app_d),
            "get": {"summary": "One application's status; its version in the ETag header.",
                    "responses": _responses("200", "404")},
            "put": {"summary": "Deploy one application from its config (as one entry of "
                               "fleet.yaml's applications). If-Match makes it conditional.",
                    "parameters": [
                        {"name": "If-Match", "in": "header", "required": False,
                         "schema": {"type": "string"}},
                        {"name": "app_dir", "in": "query", "required": False,
                         "schema": {"type": "string"}}],
                    "requestBody": _body("ApplicationConfig"),
                    "responses": _responses("202", "400", "409", "412", "413", "422")},
            "delete": {"summary": "Delete one application.",
                       "responses": _responses("202", "404")}},
        "/api/applications/{app}/graph": {
            "parameters": _params(*app_d),
            "get": {"summary": "Deployments and the handles between them.",
                    "responses": _responses("200", "404")}},
        "/api/applications/{app}/deployments/{dep}": {
            "parameters": _params(*dep_d),
            "get": {"summary": "One deployment's status with its replicas.",
                    "responses": _responses("200", "404")}},
        "/api/applications/{app}/deployments/{dep}/scale": {
            "parameters": _params(*dep_d),
            "post": {"summary": "Set a fixed-size deployment's replica count.",
                     "requestBody": _body("ScaleBody"),
                     "responses": _responses("202", "400", "404", "409", "413", "422")}},
        "/api/applications/{app}/deployments/{dep}/replicas": {
            "parameters": _params(*dep_d),
            "get": {"summary": "Replicas with pid, uptime, CPU and memory; replaced ones "
                               "and why.",
                    "responses": _responses("200", "404")}},
        "/api/applications/{app}/deployments/{dep}/replicas/{replica}/restart": {
            "parameters": _params("app", "dep", "replica"),
            "post": {"summary": "Restart one replica (a replacement starts first).",
                     "responses": _responses("202", "404")}},
        "/api/applications/{app}/revisions": {
            "parameters": _params(*app_d),
            "get": {"summary": "The application's revisions, newest last.",
                    "responses": _responses("200", "404")}},
        "/api/applications/{app}/rollback": {
            "parameters": _params(*app_d),
            "post": {"summary": "Deploy an earlier revision again (default: the previous).",
                     "requestBody": _body("RollbackBody"),
                     "responses": _responses("202", "400", "404", "409", "413", "422")}},
        "/api/config": {"get": {
            "summary": "The live config (format=yaml gives YAML).",
            "parameters": [{"name": "format", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["json", "yaml"]}}],
            "responses": _responses("200", "422")}},
        "/api/events": {"get": {
            "summary": "Recent events (deploys, replicas started, died, restarted).",
            "parameters": [{"name": "since", "in": "query", "required": False,
                            "schema": {"type": "number"}}],
            "responses": _responses("200", "422")}},
        "/api/playground": {"post": {
            "summary": "Send one request through the HTTP proxy (the dashboard's playground); "
                       "its status, headers, body, latency and request id.",
            "requestBody": _body("PlaygroundRequest"),
            "responses": _responses("200", "400", "413", "422")}},
        "/api/events/stream": {"get": {
            "summary": "Events as server-sent events, one JSON object per data: line.",
            "responses": {"200": {"description": "text/event-stream",
                                  "content": {"text/event-stream": {"schema":
                                                                    {"type": "string"}}}}}}},
        **_observe_paths(),
    }
    return {"openapi": "3.1.0",
            "info": {"title": "fleet management API", "version": __version__},
            "paths": paths,
            "components": {"schemas": schemas,
                           "securitySchemes": {"token": {"type": "http",
                                                         "scheme": "bearer"}}},
            "security": [{"token": []}]}


def spec() -> dict[str, Any]:
    """A copy of the document (callers may extend it)."""
    return copy.deepcopy(_spec())
