"""The ``fleet`` command: run applications in the foreground and inspect an instance."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import signal
import sys
from typing import Any

import click
import yaml
from pydantic import ValidationError

from fleet._config import FleetConfig, validation_message


class CLIError(click.ClickException):
    """A one-line error; exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"fleet: error: {self.message}", err=True)


def import_attr(import_path: str, app_dir: str | None = None) -> Any:
    """Import ``module:attr`` (or ``module.attr``), with one-line errors."""
    if app_dir is not None:
        sys.path.insert(0, os.path.abspath(app_dir))
    if ":" in import_path:
        module_name, _, attr = import_path.partition(":")
    else:
        module_name, _, attr = import_path.rpartition(".")
    if not module_name or not attr:
        raise CLIError(f"bad import path {import_path!r}: expected MODULE:ATTRIBUTE, "
                       "e.g. my_app:app")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CLIError(f"cannot import module {module_name!r} (from {import_path!r}): "
                           f"no such module; check the path or pass --app-dir") from None
        raise CLIError(f"importing module {module_name!r} failed: {exc}") from None
    except Exception as exc:
        raise CLIError(f"importing module {module_name!r} raised "
                       f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def resolve_app(obj: Any, import_path: str, args: dict[str, Any] | None = None) -> Any:
    """An Application, or a function returning one (called with args)."""
    from fleet._deployment import Application
    if isinstance(obj, Application):
        if args:
            raise CLIError(f"{import_path!r} is an Application, so it takes no args; point "
                           "import_path at a function returning an Application to pass args")
        return obj
    if callable(obj) and not isinstance(obj, type) and not hasattr(obj, "bind"):
        app = _call_builder(obj, import_path, args or {})
        if isinstance(app, Application):
            return app
        raise CLIError(f"{import_path!r} returned {type(app).__name__}, not a fleet "
                       "Application; return Deployment.bind(...)")
    hint = " (did you forget .bind()?)" if hasattr(obj, "bind") else ""
    raise CLIError(f"{import_path!r} is a {type(obj).__name__}, not a fleet Application{hint}")


def _call_builder(fn: Any, import_path: str, args: dict[str, Any]) -> Any:
    """Call an application builder with the config's args: as keywords when they name
    its parameters (``build(greeting=...)``), else as one dict (``build(args)``); with no
    args, with nothing or an empty dict."""
    ways: list[tuple[tuple[Any, ...], dict[str, Any]]] = [((), args), ((args,), {})]
    try:
        sig: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    for call_args, call_kwargs in ways:
        try:
            if sig is not None:
                sig.bind(*call_args, **call_kwargs)
        except TypeError:
            continue
        try:
            return fn(*call_args, **call_kwargs)
        except Exception as exc:
            raise CLIError(f"calling {import_path!r} raised {type(exc).__name__}: "
                           f"{exc}") from None
    raise CLIError(f"{import_path!r} cannot be called with the config's args "
                   f"{sorted(args)}: its signature is {import_path.split(':')[-1]}{sig}; "
                   "take one dict argument or keyword arguments")


def apply_overrides(app: Any, overrides: dict[str, dict[str, Any]]) -> Any:
    """Apply per-deployment option overrides by name throughout the graph."""
    from fleet._deployment import Application
    from fleet.dag import MethodNode
    seen: dict[int, Any] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, MethodNode):
            if id(value) not in seen:
                seen[id(value)] = MethodNode(walk(value.app), value.method, walk(value.args),
                                             walk(value.kwargs))
            return seen[id(value)]
        if isinstance(value, Application):
            if id(value) in seen:
                return seen[id(value)]
            dep = value.deployment
            if dep.name in overrides:
                dep = dep.options(**overrides[dep.name])
            new = Application(dep, walk(value.args), walk(value.kwargs))
            for attr in ("_legacy_refs",):
                if hasattr(value, attr):
                    setattr(new, attr, getattr(value, attr))
            seen[id(value)] = new
            return new
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple):
            return tuple(walk(v) for v in value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return walk(app)


def load_config(path: str) -> FleetConfig:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as exc:
        raise CLIError(f"cannot read config {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CLIError(f"config {path!r} is not valid YAML: {exc}") from None
    try:
        return FleetConfig(**raw)
    except ValidationError as exc:
        raise CLIError(validation_message(exc, f"config {path!r}")) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fleet", prog_name="fleet")
def cli() -> None:
    """fleet: serve models and Python microservices as replicated deployments."""


@cli.command()
@click.argument("target")
@click.option("--app-dir", default=None, help="Directory to import the application from.")
@click.option("--name", default=None, help="Application name (default: 'default').")
@click.option("--route-prefix", default=None, help="HTTP route prefix (default: '/').")
@click.option("--host", default=None, help="HTTP host (default: 127.0.0.1).")
@click.option("--port", default=None, type=int, help="HTTP port (default: 8000).")
@click.option("--grpc-port", default=None, type=int, help="Also serve gRPC on this port.")
@click.option("--dev", is_flag=True, help="Development: error responses include the "
                                           "exception's type and message.")
def run(target: str, app_dir: str | None, name: str | None, route_prefix: str | None,
        host: str | None, port: int | None, grpc_port: int | None, dev: bool) -> None:
    """Run TARGET (MODULE:ATTR or CONFIG.yaml) in the foreground until Ctrl-C or SIGTERM."""
    import fleet
    from fleet._api import shutdown
    if app_dir is None:
        app_dir = "."
    sys.path.insert(0, os.path.abspath(app_dir))
    if target.endswith((".yaml", ".yml")):
        config = load_config(target)
        if name is not None or route_prefix is not None:
            if len(config.applications) != 1:
                raise CLIError("--name and --route-prefix apply to a config with exactly one "
                               "application")
            if name is not None:
                config.applications[0].name = name
            if route_prefix is not None:
                config.applications[0].route_prefix = route_prefix
    else:
        from fleet._config import ApplicationConfig
        config = FleetConfig(applications=[ApplicationConfig(
            name=name or "default", route_prefix=route_prefix or "/", import_path=target)])
    if host is not None:
        config.http_options.host = host
    if port is not None:
        config.http_options.port = port
    if grpc_port is not None:
        config.grpc_options.port = grpc_port
        config.grpc_options.enabled = True
    if config.grpc_options.grpc_servicer_functions:
        config.grpc_options.enabled = True
    if dev:
        config.http_options.expose_errors = True
        config.grpc_options.expose_errors = True
    apps = []
    for app_cfg in config.applications:
        obj = import_attr(app_cfg.import_path)
        app = resolve_app(obj, app_cfg.import_path, app_cfg.args)
        overrides = {d.name: d.overrides() for d in app_cfg.deployments}
        if overrides:
            try:
                app = apply_overrides(app, overrides)
            except (TypeError, ValueError) as exc:
                raise CLIError(str(exc)) from None
        apps.append((app_cfg, app))
    if not apps:
        raise CLIError(f"{target!r} defines no applications")

    from fleet._api import StopSignals
    stop = StopSignals()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        fleet.start(http_options=config.http_options,
                    grpc_options=config.grpc_options if config.grpc_options.enabled else None)
        for app_cfg, app in apps:
            fleet.run(app, name=app_cfg.name, route_prefix=app_cfg.route_prefix)
        if config.traffic:
            from fleet._api import _apply_traffic
            try:
                _apply_traffic(config.traffic)
            except (TypeError, ValueError) as exc:
                raise CLIError(str(exc)) from None
        stop.serving()
        _print_serving(fleet.status())
        while not stop.event.wait(0.5):
            pass
        click.echo("fleet: shutting down", err=True)
    except KeyboardInterrupt:
        # a signal while starting: whatever was starting is stopped, nothing is left
        stop.serving()          # a second signal must not interrupt the shutdown
        click.echo("fleet: interrupted while starting; shutting down", err=True)
        shutdown()
        sys.exit(1)
    except fleet.DeploymentFailedError as exc:
        click.echo(f"fleet: error: {exc}", err=True)
        shutdown()
        sys.exit(1)
    except fleet.FleetError as exc:
        click.echo(f"fleet: error: {exc}", err=True)
        shutdown()
        sys.exit(1)
    finally:
        shutdown()


def _print_serving(status: dict[str, Any]) -> None:
    proxies = status.get("proxies", {})
    http = proxies.get("http")
    grpc = proxies.get("grpc")
    for name, app in status["applications"].items():
        deps = ", ".join(f"{d} x{len(info['replicas'])}"
                         for d, info in app["deployments"].items())
        where = ""
        if app.get("protocol") == "grpc" and grpc:
            where = f" on gRPC {grpc['host']}:{grpc['port']}"
        elif http and app["route_prefix"] is not None:
            where = f" at http://{http['host']}:{http['port']}{app['route_prefix']}"
        click.echo(f"fleet: application {name!r} RUNNING{where} ({deps})")
    if http:
        click.echo(f"fleet: HTTP on http://{http['host']}:{http['port']}")
    if grpc:
        click.echo(f"fleet: gRPC on {grpc['host']}:{grpc['port']}")
    click.echo("fleet: press Ctrl-C to stop")
    sys.stdout.flush()


def _connect_instance() -> tuple[str, bytes]:
    from fleet import _rundir
    from fleet.exceptions import FleetError
    try:
        found = _rundir.live_instances()
    except FleetError as exc:
        raise CLIError(str(exc)) from None
    if not found:
        raise CLIError("no fleet instance is running on this machine for this user (start one "
                       "with `fleet run`)")
    path, info = found[0]
    if len(found) > 1:
        others = ", ".join(str(i["pid"]) for _, i in found[1:])
        click.echo(f"fleet: {len(found)} instances are running; talking to the newest, "
                   f"pid {info['pid']} ({path}); the others are pids {others}", err=True)
    try:
        return str(info["address"]), bytes.fromhex(info["secret"])
    except (KeyError, ValueError, TypeError):
        raise CLIError(f"the instance file {path} is malformed") from None


async def _controller_call(method: str, *args: Any) -> Any:
    from fleet._runtime import Runtime
    address, secret = _connect_instance()
    rt = Runtime(asyncio.get_running_loop(), address, secret)
    try:
        await rt.connect_controller(subscribe=False)
    except OSError as exc:
        raise CLIError(f"cannot reach the fleet instance recorded on this machine: "
                       f"{exc}") from None
    try:
        return await rt.call_controller(method, *args)
    finally:
        if rt.controller is not None:
            rt.controller.close()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def status(as_json: bool) -> None:
    """Show applications, deployments and replicas of the running instance."""
    result = asyncio.run(_controller_call("status"))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(yaml.safe_dump(result, sort_keys=False).rstrip())


def main() -> None:
    """Console entry point."""
    cli()
