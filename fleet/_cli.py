"""The ``fleet`` command: run applications in the foreground and inspect an instance."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import click

from fleet._config import FleetConfig
from fleet._imports import (  # noqa: F401  (re-exported)
    CLIError,
    apply_backend_options,
    apply_overrides,
    backend_options,
    config_overrides,
    import_attr,
    load_config,
    resolve_app,
)
from fleet._manage.commands import COMMANDS
from fleet._manage.observe_cli import COMMANDS as OBSERVE_COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fleet", prog_name="fleet")
def cli() -> None:
    """fleet: serve models and Python microservices as replicated deployments."""


@cli.command()
@click.argument("target")
@click.option("--app-dir", default=None, help="Directory to import the application from "
              "(default: the current one, for a config file too).")
@click.option("--name", default=None, help="Application name (default: 'default').")
@click.option("--route-prefix", default=None, help="HTTP route prefix (default: '/').")
@click.option("--host", default=None, help="HTTP host (default: 127.0.0.1).")
@click.option("--port", default=None, type=int, help="HTTP port (default: 8000).")
@click.option("--grpc-port", default=None, type=int, help="Also serve gRPC on this port.")
@click.option("--dev", is_flag=True, help="Development: error responses include the "
                                           "exception's type and message.")
@click.option("--reload", is_flag=True, help="Redeploy what changed when the application's "
              "files change.")
@click.option("--address", default=None, metavar="HOST:PORT",
              help="The management API's address (default: 127.0.0.1:8100, or a free "
                   "port when that one is taken).")
@backend_options
def run(target: str, app_dir: str | None, name: str | None, route_prefix: str | None,
        host: str | None, port: int | None, grpc_port: int | None, dev: bool,
        reload: bool, address: str | None, backend: str | None, ray_address: str | None,
        proxy_location: str | None) -> None:
    """Run TARGET (MODULE:ATTR or CONFIG.yaml) in the foreground until Ctrl-C or SIGTERM."""
    from fleet._api import deploy, shutdown, start_owned
    from fleet._api import status as instance_status
    from fleet.exceptions import DeploymentFailedError, FleetError
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
    for flag, value in (("--port", port), ("--grpc-port", grpc_port)):
        if value is not None and not 0 <= value <= 65535:
            raise CLIError(f"{flag} must be a port number from 0 to 65535 (0 picks a free "
                           f"one), got {value}")
    from fleet._config import ManagementOptions
    management = ManagementOptions()
    if address is not None:
        from fleet._manage.client import ClientError, split_address
        try:
            management.host, management.port = split_address(address, "--address")
        except ClientError as exc:
            raise CLIError(str(exc)) from None
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
    apply_backend_options(config, backend, ray_address, proxy_location)
    apps = _load_apps(config)
    if not apps:
        raise CLIError(f"{target!r} defines no applications")
    watcher = None
    if reload:
        from fleet._reload import Watcher
        roots = {os.path.abspath(app_dir)}
        extra = []
        if target.endswith((".yaml", ".yml")):
            roots.add(os.path.dirname(os.path.abspath(target)))
            extra.append(target)
        for app_cfg in config.applications:
            file_part = app_cfg.import_path.partition(":")[0]
            if file_part.endswith(".py"):
                roots.add(os.path.dirname(os.path.abspath(file_part)))
        watcher = Watcher(roots, extra)

    import logging

    from fleet._api import StopSignals
    from fleet._logformat import DATEFMT, log_format
    # the driver's own warnings (a replica replaced, say) in the format of every other line
    logging.basicConfig(level=logging.WARNING, datefmt=DATEFMT, format=log_format("driver"))
    stop = StopSignals()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        # `fleet run` always serves an instance of its own, whatever else runs
        # on Ray, the application's directory goes to every node, as `serve run` does
        runtime_env = {"working_dir": os.path.abspath(app_dir)} \
            if config.backend == "ray" else None
        inst = start_owned(config.http_options, config.grpc_options, management,
                           management_fallback=True, logging_config=config.logging_config,
                           backend=config.backend, ray_address=config.ray_address,
                           proxy_location=config.proxy_location, runtime_env=runtime_env,
                           wait_proxies=False)
        # the proxies start while the first application's replicas do; a proxy that
        # cannot serve (its port taken) stops everything before anything is reported
        for app_cfg, app in apps:
            try:
                deploy(app, name=app_cfg.name, route_prefix=app_cfg.route_prefix,
                       progress=True, before_wait=inst.wait_proxies)
            except (TypeError, ValueError) as exc:
                raise CLIError(str(exc)) from None
        if config.traffic:
            from fleet._api import _apply_traffic
            try:
                _apply_traffic(config.traffic)
            except (TypeError, ValueError) as exc:
                raise CLIError(str(exc)) from None
        stop.serving()
        _print_serving(instance_status(), inst, management)
        while not stop.event.wait(0.5):
            if inst.closed:             # stopped from another process (fleet.shutdown())
                break
            if watcher is not None:
                changed = watcher.changed()
                if changed:
                    _reload(watcher, changed, target, config)
        click.echo("fleet: shutting down", err=True)
    except KeyboardInterrupt:
        # a signal while starting: whatever was starting is stopped, nothing is left
        stop.serving()          # a second signal must not interrupt the shutdown
        click.echo("fleet: interrupted while starting; shutting down", err=True)
        shutdown()
        sys.exit(1)
    except DeploymentFailedError as exc:
        click.echo(f"fleet: error: {exc}", err=True)
        shutdown()
        sys.exit(1)
    except FleetError as exc:
        click.echo(f"fleet: error: {exc}", err=True)
        shutdown()
        sys.exit(1)
    finally:
        shutdown()


def _load_apps(config: FleetConfig) -> list[tuple[Any, Any]]:
    """Import every application of config, with its overrides applied."""
    apps = []
    for app_cfg in config.applications:
        obj = import_attr(app_cfg.import_path)
        app = resolve_app(obj, app_cfg.import_path, app_cfg.args)
        overrides = config_overrides(app, app_cfg)
        if overrides:
            try:
                app = apply_overrides(app, overrides)
            except (TypeError, ValueError) as exc:
                raise CLIError(str(exc)) from None
        apps.append((app_cfg, app))
    return apps


def _versions(status: dict[str, Any]) -> dict[str, set[str]]:
    return {f"{app}/{dep}": {r["version"] for r in info["replicas"] if r["state"] == "RUNNING"}
            for app, a in status["applications"].items()
            for dep, info in a["deployments"].items()}


def _reload(watcher: Any, changed: list[str], target: str, config: FleetConfig) -> None:
    """Import the changed application afresh and redeploy it: deployments whose code and
    options did not change keep their replicas; a failure keeps the previous version."""
    from fleet._api import deploy
    from fleet._api import status as instance_status
    from fleet.exceptions import FleetError
    names = ", ".join(os.path.relpath(p) for p in changed)
    click.echo(f"fleet: {names} changed; reloading", err=True)
    before = _versions(instance_status())
    watcher.forget_modules()
    try:
        if target.endswith((".yaml", ".yml")):
            fresh = load_config(target)
            config.applications = fresh.applications
        apps = _load_apps(config)
        for app_cfg, app in apps:
            deploy(app, name=app_cfg.name, route_prefix=app_cfg.route_prefix, progress=True)
    except (CLIError, FleetError, TypeError, ValueError) as exc:
        text = exc.message if isinstance(exc, CLIError) else str(exc)
        click.echo(f"fleet: error: {text}", err=True)
        click.echo("fleet: reload failed; the previous version keeps serving", err=True)
    else:
        after = _versions(instance_status())
        rolled = sorted(d for d in after if after[d] != before.get(d))
        kept = sorted(d for d in after if after[d] == before.get(d))
        click.echo(f"fleet: reloaded: rolled {', '.join(rolled) or 'nothing'}; kept "
                   f"{', '.join(kept) or 'nothing'}", err=True)
    finally:
        watcher.rescan()


def _print_serving(status: dict[str, Any], inst: Any = None, management: Any = None) -> None:
    from fleet._api import _print_addresses
    _print_addresses(status)
    proxies = status.get("proxies", {})
    http, grpc = proxies.get("http"), proxies.get("grpc")
    if http:
        click.echo(f"fleet: HTTP on {http.get('scheme', 'http')}://{http['host']}:"
                   f"{http['port']}", err=True)

    if grpc:
        click.echo(f"fleet: gRPC on {grpc['host']}:{grpc['port']}", err=True)
    if inst is not None and inst.ops is not None:
        if management is not None and management.port and inst.ops.port != management.port:
            click.echo(f"fleet: port {management.port} is taken; the management API "
                       f"listens on port {inst.ops.port}", err=True)
        click.echo(f"fleet: management API at {inst.ops.url()}/api/docs; dashboard: "
                   f"{inst.dashboard_url()}", err=True)
    click.echo("fleet: press Ctrl-C to stop", err=True)


for _command in COMMANDS + OBSERVE_COMMANDS:     # fleet top/metrics/logs: observe_cli
    cli.add_command(_command)


def main() -> None:
    """Console entry point."""
    cli()
