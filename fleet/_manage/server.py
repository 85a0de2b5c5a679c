"""The management server: a Starlette app on the instance's own event loop, in the
process that owns the instance, with direct access to its Controller (no extra hop).

Routes are one list, :data:`ROUTES`, of ``(method, path, handler)``; a handler is
``async def handler(request, ops) -> Response`` where ``ops`` is the :class:`Ops` of the
instance (its controller, its options, its token). Adding an endpoint is one entry.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fleet._config import ApplicationConfig, ManagementOptions
from fleet._manage import dashboard, observe
from fleet._manage.models import RollbackBody, ScaleBody
from fleet._version import __version__

if TYPE_CHECKING:
    from fleet._api import Instance
    from fleet._controller.controller import Controller

Handler = Callable[[Request, "Ops"], Awaitable[Response]]

MAX_BODY_BYTES = 1 << 20        # a request body to the API: one application's config
SSE_KEEPALIVE_S = 15.0
STREAM_MAX_S = 3600.0           # an event stream ends after an hour; clients reconnect
COOKIE = dashboard.COOKIE        # the token, once the dashboard set it
IMPORT_TIMEOUT_S = 120.0        # importing and building one application for a PUT
MAX_CONNECTIONS = 256           # the management server's open connections (streams too)


class ApiError(Exception):
    """An error answered as ``{"error": ..., "request_id": ...}`` with its status."""

    def __init__(self, status: int, message: str, detail: list[Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


class Ops:
    """What the handlers work with: the instance, its controller and its token."""

    def __init__(self, instance: Instance, options: ManagementOptions, token: str) -> None:
        self.instance = instance
        self.options = options
        self.token = token
        self.started_at = time.time()
        self.host = options.host
        self.port = options.port
        self.scheme = "https" if instance.http_options.ssl_certfile else "http"
        self._deploy_lock = asyncio.Lock()      # one PUT imports and deploys at a time
        self._procs: dict[int, Any] = {}        # pid -> psutil.Process, for CPU percent
        self.closing = asyncio.Event()

    @property
    def controller(self) -> Controller:
        assert self.instance.controller is not None
        return self.instance.controller

    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    # -- reads ----------------------------------------------------------------------
    def app_state(self, name: str) -> Any:
        app = self.controller.apps.get(name)
        if app is None or app.deleting:
            raise ApiError(404, f"no application named {name!r}; running: "
                                f"{self.app_names() or 'none'}. List them with GET "
                                "/api/applications")
        return app

    def app_names(self) -> list[str]:
        return sorted(n for n, a in self.controller.apps.items() if not a.deleting)

    def application(self, name: str, everything: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
        app = self.app_state(name)
        if everything is None:
            everything = self.controller.status()
        status = everything["applications"][name]
        status["name"] = name
        status["version"] = str(app.revision)
        status["revision"] = app.revision
        status["deployed_at"] = app.deployed_at
        status["converged"] = _converged(app)
        return dict(status)

    def replica_rows(self, dep: Any) -> list[dict[str, Any]]:
        import psutil
        now_mono, now = time.monotonic(), time.time()
        self.forget_gone()
        rows = []
        for rec in dep.replicas.values():
            cpu: float | None = None
            rss: int | None = None
            if rec.pid:
                proc = self._procs.get(rec.pid)
                try:
                    if proc is None:
                        proc = self._procs[rec.pid] = psutil.Process(rec.pid)
                    cpu = proc.cpu_percent(None)    # since the previous read (0.0 first)
                    rss = proc.memory_info().rss
                except psutil.Error:
                    self._procs.pop(rec.pid, None)
            rows.append({"replica_id": rec.replica_id, "state": rec.state.value,
                         "pid": rec.pid, "node_id": socket.gethostname(),
                         "started_at": round(now - (now_mono - rec.started_at), 3),
                         "uptime_s": round(now_mono - rec.started_at, 1),
                         "cpu_percent": cpu, "rss_bytes": rss, "ongoing": rec.ongoing,
                         "version": rec.version, "message": rec.message})
        return rows

    def forget_gone(self) -> None:
        """Drop the cached process handles of replicas that are gone."""
        live = {r.pid for a in self.controller.apps.values() for d in a.deployments.values()
                for r in d.replicas.values()}
        for pid in [p for p in self._procs if p not in live]:
            del self._procs[pid]

    def config_of(self, name: str) -> dict[str, Any]:
        """An application's live config: what its current revision was deployed with,
        or, for one deployed from Python, its deployments' options."""
        app = self.app_state(name)
        rev = self.controller.revisions.get(name, app.revision)
        if rev is not None and rev["config"] is not None:
            return dict(rev["config"])
        deployments = []
        for dep in app.deployments.values():
            if dep.deleting:
                continue
            opts = dep.plan.config.model_dump(exclude_defaults=True, mode="json")
            opts.pop("name", None)
            deployments.append({"name": dep.name, **opts})
        return {"name": name, "route_prefix": app.route_prefix, "import_path": None,
                "deployments": deployments}

    # -- changes --------------------------------------------------------------------
    async def put_application(self, name: str, config: ApplicationConfig,
                              if_match: str | None, app_dir: str | None) -> int:
        async with self._deploy_lock:
            self._check_if_match(name, if_match)
            try:
                plans, protocol, grpc_port, needs_grpc, sys_path = await asyncio.wait_for(
                    asyncio.to_thread(_build, config, app_dir), IMPORT_TIMEOUT_S)
            except asyncio.TimeoutError:
                message = (f"application {name!r}: importing {config.import_path!r} did not "
                           f"finish within {IMPORT_TIMEOUT_S:g} s; imports should not wait "
                           "on anything (load models in the constructor instead)")
                self.controller.events.add("deploy_failed", name, "", "", message)
                raise ApiError(400, message) from None
            except _BuildError as exc:
                self.controller.events.add("deploy_failed", name, "", "", str(exc))
                raise ApiError(400, str(exc)) from None
            # no await between this check and the deploy: a concurrent change either
            # happened before it (412) or comes after this deploy
            self._check_if_match(name, if_match)
            if needs_grpc and not self.instance.grpc_options.enabled:
                raise ApiError(400, f"application {name!r} needs the gRPC proxy, which this "
                                    "instance does not run; start it with --grpc-port")
            origin = {"sys_path": sys_path, "cwd": app_dir or os.getcwd(),
                      "config": config.model_dump(mode="json", exclude_defaults=True)
                      | {"name": name, "import_path": config.import_path}}
            try:
                await self.controller.rpc_deploy(None, name, config.route_prefix,
                                                 plans, protocol, grpc_port, origin)
            except ValueError as exc:
                raise ApiError(409, f"application {name!r}: {exc}") from None
            return int(self.controller.apps[name].revision)

    def _check_if_match(self, name: str, if_match: str | None) -> None:
        if if_match is None:
            return
        app = self.controller.apps.get(name)
        current = str(app.revision) if app is not None and not app.deleting else "0"
        wanted = [t.strip().removeprefix("W/").strip('"') for t in if_match.split(",")]
        if "*" in wanted and current != "0":
            return
        if current not in wanted:
            raise ApiError(412, f"application {name!r} is at version {current}, not "
                                f"{if_match}: someone changed it since you read it. GET it "
                                "again, check the change, and retry with the new ETag")


def _plain_options(options: Any) -> dict[str, Any]:
    """Options set to other than their defaults, as YAML/JSON values (no objects)."""
    return {k: v for k, v in options.model_dump(exclude_defaults=True, mode="json",
                                                exclude={"middlewares", "enabled"}).items()
            if isinstance(v, (str, int, float, bool, list, type(None)))}


class _BuildError(Exception):
    pass


def _converged(app: Any) -> bool:
    """Every deployment healthy, on its current plan, at its target count."""
    from fleet._types import DeploymentStatus, ReplicaState
    for dep in app.deployments.values():
        if dep.deleting:
            continue
        if dep.status != DeploymentStatus.HEALTHY:
            return False
        current = [r for r in dep.live() if r.version == dep.plan.version
                   and r.state == ReplicaState.RUNNING]
        if len(current) != dep.target or len(dep.live()) != dep.target:
            return False
    return True


_import_lock = __import__("threading").Lock()


def _build(config: ApplicationConfig, app_dir: str | None
           ) -> tuple[list[Any], str, int | None, bool, list[str]]:
    """Import the application (app_dir first on sys.path, its modules read afresh) and
    flatten it into plans. Runs in a worker thread; every failure is a _BuildError with
    the exact error."""
    from fleet._deployment import build_plans
    from fleet._imports import (
        CLIError,
        apply_overrides,
        config_overrides,
        import_attr,
        resolve_app,
    )
    from fleet._reload import Watcher
    from fleet.drivers import prepare_app
    where = f"application {config.name!r}"
    with _import_lock:
        if app_dir is not None:
            if not os.path.isdir(app_dir):
                raise _BuildError(f"{where}: app_dir {app_dir!r} is not a directory on the "
                                  "instance's machine")
            Watcher({os.path.abspath(app_dir)}, []).forget_modules()
        before = list(sys.path)
        try:
            obj = import_attr(config.import_path, app_dir)
            app = resolve_app(obj, config.import_path, config.args)
            overrides = config_overrides(app, config)
            if overrides:
                app = apply_overrides(app, overrides)
            app, protocol, grpc_port, needs_grpc = prepare_app(app)
            plans = build_plans(app, config.name)
        except CLIError as exc:
            raise _BuildError(f"{where}: {exc.message}") from None
        except Exception as exc:
            raise _BuildError(f"{where}: {type(exc).__name__}: {exc}") from None
        finally:
            used = list(sys.path)
            sys.path[:] = before
    return plans, protocol, grpc_port, needs_grpc, used


# -- helpers for handlers ---------------------------------------------------------------

def _rid(request: Request) -> str:
    return str(request.scope.get("fleet_request_id", ""))


def ok(request: Request, body: Any, status: int = 200,
       headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """The body parsed as model: 413 when too big, 400 when not JSON, 422 listing each
    bad field otherwise."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise ApiError(413, f"request body too large: at most {MAX_BODY_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body too large: at most {MAX_BODY_BYTES} bytes")
    try:
        raw = json.loads(body or b"null")
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}; send "
                            "Content-Type: application/json with a JSON object") from None
    if not isinstance(raw, dict):
        raise ApiError(422, f"request body must be a JSON object, got "
                            f"{type(raw).__name__}",
                       [{"loc": ["body"], "msg": "expected a JSON object"}])
    try:
        return model(**raw)
    except ValidationError as exc:
        detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]
        first = detail[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "body"
        raise ApiError(422, f"invalid request body: {where}: {first['msg']}"
                            + (f" (and {len(detail) - 1} more problem(s))"
                               if len(detail) > 1 else ""), detail) from None


def _int_param(request: Request, name: str, default: float) -> float:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ApiError(422, f"query parameter {name!r} must be a number, got {value!r}",
                       [{"loc": ["query", name], "msg": "must be a number"}]) from None


# -- handlers ----------------------------------------------------------------------------

async def get_instance(request: Request, ops: Ops) -> Response:
    inst = ops.instance
    everything = ops.controller.status()
    body = {"instance_id": os.path.basename(inst.dir), "pid": os.getpid(),
            "version": __version__, "backend": inst.backend.name,
            "ray_address": getattr(inst, "ray_address", None),
            "started_at": ops.started_at,
            "management": {"host": ops.host, "port": ops.port, "scheme": ops.scheme},
            "proxies": everything["proxies"], "traffic": everything["traffic"]}
    if "proxies_by_node" in everything:       # on a cluster: each node's proxies
        body["proxies_by_node"] = everything["proxies_by_node"]
    return ok(request, body)


async def list_applications(request: Request, ops: Ops) -> Response:
    everything = ops.controller.status()
    return ok(request, {"applications": {n: ops.application(n, everything)
                                         for n in ops.app_names()}})


async def get_application(request: Request, ops: Ops) -> Response:
    status = ops.application(request.path_params["app"])
    return ok(request, status, headers={"ETag": f'"{status["version"]}"'})


async def put_application(request: Request, ops: Ops) -> Response:
    name = request.path_params["app"]
    config = await read_json(request, ApplicationConfig)
    if "name" in config.model_fields_set and config.name != name:
        raise ApiError(422, f"the body names application {config.name!r} but the path "
                            f"names {name!r}; make them agree or leave name out",
                       [{"loc": ["body", "name"], "msg": f"must be {name!r}"}])
    config.name = name
    app_dir = request.query_params.get("app_dir")
    revision = await ops.put_application(name, config, request.headers.get("if-match"),
                                         app_dir)
    return ok(request, {"version": str(revision), "revision": revision}, 202,
              headers={"ETag": f'"{revision}"'})


async def delete_application(request: Request, ops: Ops) -> Response:
    name = request.path_params["app"]
    ops.app_state(name)
    task = asyncio.get_running_loop().create_task(ops.controller.rpc_delete(None, name))  # type: ignore[arg-type]
    _background.add(task)
    task.add_done_callback(_background.discard)
    return ok(request, {"deleting": name}, 202)


_background: set[asyncio.Task[Any]] = set()


async def get_graph(request: Request, ops: Ops) -> Response:
    app = ops.app_state(request.path_params["app"])
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, str]] = []
    for dep in app.deployments.values():
        if dep.deleting:
            continue
        nodes.append({"deployment": dep.name, "ingress": dep.name == app.ingress,
                      "status": dep.status.value,
                      "running_replicas": len(dep.running()),
                      "target_replicas": dep.target})
        edges.extend({"from": dep.name, "to": child} for child in dep.plan.calls)
    return ok(request, {"nodes": nodes, "edges": edges})


def _deployment(request: Request, ops: Ops) -> Any:
    app_name, dep_name = request.path_params["app"], request.path_params["dep"]
    ops.app_state(app_name)
    try:
        return ops.controller.find_deployment(app_name, dep_name)
    except KeyError as exc:
        raise ApiError(404, str(exc.args[0])) from None


async def get_deployment(request: Request, ops: Ops) -> Response:
    dep = _deployment(request, ops)
    info = dict(ops.controller.status()["applications"][dep.app]["deployments"][dep.name])
    info["name"] = dep.name
    info["replicas"] = ops.replica_rows(dep)
    info["replaced_total"] = dep.replaced_total
    return ok(request, info)


async def scale_deployment(request: Request, ops: Ops) -> Response:
    dep = _deployment(request, ops)
    body = await read_json(request, ScaleBody)
    try:
        await ops.controller.rpc_scale(None, dep.app, dep.name, body.num_replicas)
    except ValueError as exc:
        raise ApiError(409, str(exc)) from None
    return ok(request, {"num_replicas": body.num_replicas}, 202)


async def list_replicas(request: Request, ops: Ops) -> Response:
    dep = _deployment(request, ops)
    return ok(request, {"replicas": ops.replica_rows(dep), "replaced": list(dep.replaced),
                        "replaced_total": dep.replaced_total})


async def restart_replica(request: Request, ops: Ops) -> Response:
    dep = _deployment(request, ops)
    try:
        await ops.controller.rpc_restart_replica(None, dep.app, dep.name,
                                                 request.path_params["replica"])
    except KeyError as exc:
        raise ApiError(404, str(exc.args[0])) from None
    return ok(request, {"restarting": request.path_params["replica"]}, 202)


async def list_revisions(request: Request, ops: Ops) -> Response:
    name = request.path_params["app"]
    revisions = ops.controller.revisions.list(name)
    if not revisions:
        raise ApiError(404, f"application {name!r} has no revisions: it was never deployed")
    app = ops.controller.apps.get(name)
    current = app.revision if app is not None and not app.deleting else None
    out = [{"revision": r["revision"], "version": str(r["revision"]), "time": r["time"],
            "config": r["config"], "note": r["note"],
            "status": "current" if r["revision"] == current else "superseded"}
           for r in revisions]
    return ok(request, {"revisions": out})


async def rollback(request: Request, ops: Ops) -> Response:
    name = request.path_params["app"]
    body = await read_json(request, RollbackBody)
    try:
        revision = await ops.controller.rpc_rollback(None, name, body.to)
    except KeyError as exc:
        raise ApiError(404, str(exc.args[0])) from None
    except ValueError as exc:
        raise ApiError(409, str(exc)) from None
    return ok(request, {"version": str(revision), "revision": revision}, 202)


async def get_config(request: Request, ops: Ops) -> Response:
    config = {"http_options": _plain_options(ops.instance.http_options),
              "applications": [ops.config_of(n) for n in ops.app_names()]}
    if ops.instance.grpc_options.enabled:
        config["grpc_options"] = _plain_options(ops.instance.grpc_options)
    fmt = request.query_params.get("format", "json")
    if fmt == "yaml":
        import yaml
        return PlainTextResponse(yaml.safe_dump(config, sort_keys=False),
                                 media_type="text/yaml")
    if fmt != "json":
        raise ApiError(422, f"query parameter 'format' must be json or yaml, got {fmt!r}",
                       [{"loc": ["query", "format"], "msg": "must be json or yaml"}])
    return ok(request, config)


async def get_events(request: Request, ops: Ops) -> Response:
    since = _int_param(request, "since", 0.0)
    return ok(request, {"events": ops.controller.events.since(since)})


async def stream_events(request: Request, ops: Ops) -> Response:
    since = _int_param(request, "since", time.time())
    events = ops.controller.events

    async def body() -> Any:
        seq = 0
        for event in events.since(since):
            seq = event["seq"]
            yield f"data: {json.dumps(event)}\n\n"
        if not seq:
            seq = events.seq
        deadline = time.monotonic() + STREAM_MAX_S
        while not ops.closing.is_set() and time.monotonic() < deadline:
            await events.wait(seq, SSE_KEEPALIVE_S)
            fresh = events.since(after_seq=seq)
            if not fresh:
                yield ": keep-alive\n\n"
            for event in fresh:
                seq = event["seq"]
                yield f"data: {json.dumps(event)}\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


async def shutdown_instance(request: Request, ops: Ops) -> Response:
    stop = ops.controller.on_shutdown_request
    if stop is None:
        raise ApiError(409, "this instance cannot be stopped through its API")
    asyncio.get_running_loop().call_soon(stop)
    return ok(request, {"stopping": os.getpid()}, 202)


async def get_openapi(request: Request, ops: Ops) -> Response:
    from fleet._manage.openapi import spec
    return ok(request, spec())


DOCS_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>fleet API</title>
<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}code{background:#eee}
h2{font-size:1.1em;margin-top:1.5em}</style></head><body><h1>fleet management API</h1>
<p>Every path needs <code>Authorization: Bearer TOKEN</code>. The machine-readable spec:
<a href="/api/openapi.json">/api/openapi.json</a>.</p><div id="paths">loading...</div>
<script>
fetch('/api/openapi.json').then(r => r.json()).then(s => {
  const out = [];
  for (const [path, ops] of Object.entries(s.paths)) {
    for (const [m, op] of Object.entries(ops)) {
      out.push('<h2><code>' + m.toUpperCase() + ' ' + path + '</code></h2><p>' +
               (op.summary || '').replace(/</g, '&lt;') + '</p>');
    }
  }
  document.getElementById('paths').innerHTML = out.join('');
});
</script></body></html>"""


async def get_docs(request: Request, ops: Ops) -> Response:
    return HTMLResponse(DOCS_PAGE)


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/api/instance", get_instance),
    ("POST", "/api/instance/shutdown", shutdown_instance),
    ("GET", "/api/applications", list_applications),
    ("GET", "/api/applications/{app}", get_application),
    ("PUT", "/api/applications/{app}", put_application),
    ("DELETE", "/api/applications/{app}", delete_application),
    ("GET", "/api/applications/{app}/graph", get_graph),
    ("GET", "/api/applications/{app}/deployments/{dep}", get_deployment),
    ("POST", "/api/applications/{app}/deployments/{dep}/scale", scale_deployment),
    ("GET", "/api/applications/{app}/deployments/{dep}/replicas", list_replicas),
    ("POST", "/api/applications/{app}/deployments/{dep}/replicas/{replica}/restart",
     restart_replica),
    ("GET", "/api/applications/{app}/revisions", list_revisions),
    ("POST", "/api/applications/{app}/rollback", rollback),
    ("GET", "/api/config", get_config),
    ("GET", "/api/events", get_events),
    ("GET", "/api/events/stream", stream_events),
    ("GET", "/api/openapi.json", get_openapi),
    ("GET", "/api/docs", get_docs),
]


def _error(status: int, message: str, request_id: str,
           detail: list[Any] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "request_id": request_id}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


def _endpoint(handler: Handler, ops: Ops) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request, ops)
        except ApiError as exc:
            return _error(exc.status, exc.message, _rid(request), exc.detail)
    endpoint.__name__ = handler.__name__
    return endpoint


class Guard:
    """Outermost layer: a request id for every request, the token check, and a JSON
    body for errors nothing else answered (404, 405, 500)."""

    def __init__(self, app: ASGIApp, ops: Ops) -> None:
        self.app = app
        self.ops = ops
        self.token = ops.token.encode()

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(),
                                                                       self.token):
                    return True
            elif name == b"cookie":
                for part in value.split(b";"):
                    key, _, given = part.strip().partition(b"=")
                    if key == COOKIE.encode() and hmac.compare_digest(given, self.token):
                        return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                return
            return
        rid = secrets.token_hex(8)
        scope["fleet_request_id"] = rid
        path = scope["path"]
        # the dashboard's page checks the token itself: with it (in the address or the
        # cookie) the page, without it the sign-in page (fleet/_manage/dashboard.py)
        public = path.startswith(dashboard.PUBLIC_PREFIXES) \
            or (path == "/" and scope["method"] in ("GET", "HEAD")) \
            or (path == "/metrics" and self.ops.options.metrics_public)
        if not public and not self._authorized(scope):
            await _error(401, "this fleet instance needs its token: send "
                              "'Authorization: Bearer <token>' (the CLI finds it in the "
                              "runtime directory; elsewhere pass --token or FLEET_TOKEN)",
                         rid)(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            # build_app's handler logged it and answered; anything else is answered here
            if not started:
                import logging
                logging.getLogger("fleet.manage").exception("management API %s %s failed",
                                                            scope["method"], path)
                await _error(500, f"internal error ({type(exc).__name__}); the instance's "
                                  f"log has the traceback under request id {rid}",
                             rid)(scope, receive, send)


def build_app(ops: Ops, extra: list[tuple[str, str, Handler]] | None = None) -> ASGIApp:
    """The management app for ops: ROUTES plus extra, behind the Guard."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        text = {404: f"no such path {request.url.path!r}; the API is described at "
                     "/api/openapi.json",
                405: f"{request.method} is not allowed on {request.url.path!r}; see "
                     "/api/openapi.json"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, text, _rid(request))

    async def crashed(request: Request, exc: Exception) -> Response:
        import logging
        rid = _rid(request)
        logging.getLogger("fleet.manage").error(
            "management API %s %s failed (request %s)", request.method, request.url.path,
            rid, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); the instance's log has "
                           f"the traceback under request id {rid}", rid)

    routes: list[BaseRoute] = [Route(path, _endpoint(handler, ops), methods=[method])
                               for method, path, handler in [*ROUTES, *(extra or [])]]
    routes += observe.routes(ops.controller)
    routes += dashboard.routes(ops.token, lambda: dashboard.proxy_base(ops.controller.proxies))
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                       Exception: crashed})
    return Guard(app, ops)


class _Server:
    """uvicorn on the instance's loop, without its own signal handling."""

    def __init__(self, app: ASGIApp, ops: Ops, sock: socket.socket) -> None:
        import uvicorn

        class Quiet(uvicorn.Server):
            def install_signal_handlers(self) -> None:  # uvicorn < 0.29
                pass

            def capture_signals(self) -> Any:  # uvicorn >= 0.29
                import contextlib
                return contextlib.nullcontext()

        http = ops.instance.http_options
        # no websockets: the API and the dashboard are plain HTTP (and not loading a
        # websocket implementation keeps the driver smaller)
        config = uvicorn.Config(app, loop="none", lifespan="off", access_log=False, ws="none",
                                log_level="warning", timeout_graceful_shutdown=2,
                                limit_concurrency=MAX_CONNECTIONS,
                                ssl_keyfile=http.ssl_keyfile, ssl_certfile=http.ssl_certfile)
        self.server = Quiet(config)
        self.sock = sock
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                exc = self.task.exception()
                raise OSError(f"the management server did not start: {exc}")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            try:
                await asyncio.wait_for(self.task, 5)
            except (asyncio.TimeoutError, Exception):
                self.task.cancel()
        self.sock.close()


def bind(host: str, port: int, fallback: bool) -> socket.socket:
    """A listening socket for the management server; with fallback, a free port when
    port is taken. Raises OSError with one line otherwise."""
    from fleet._proxy.startup import bind_socket
    try:
        return bind_socket(host, port)
    except OSError as exc:
        if fallback and port != 0:
            return bind_socket(host, 0)
        raise OSError(f"the management server cannot listen on {host}:{port}: "
                      f"{exc.strerror or exc}; stop what uses it, or pick another address "
                      "with --address HOST:PORT") from None


async def serve(instance: Instance, options: ManagementOptions, fallback: bool = False
                ) -> tuple[Ops, _Server]:
    """Start the management server for instance on the running loop."""
    token = options.token or secrets.token_urlsafe(32)
    sock = bind(options.host, options.port, fallback)
    ops = Ops(instance, options, token)
    ops.port = sock.getsockname()[1]
    server = _Server(build_app(ops), ops, sock)
    await server.start()
    return ops, server
