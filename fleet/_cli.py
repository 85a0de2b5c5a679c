"""The ``fleet`` command: run applications in the foreground and inspect an instance."""

from __future__ import annotations

import asyncio
import difflib
import importlib
import inspect
import json
import os
import signal
import sys
from typing import Any

import click
from pydantic import ValidationError

from fleet._config import FleetConfig, describe_errors


class CLIError(click.ClickException):
    """A one-line error; exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"fleet: error: {self.message}", err=True)


def import_attr(import_path: str, app_dir: str | None = None) -> Any:
    """Import ``module:attr``, ``module.attr`` or ``path/to/file.py[:attr]``, with one-line
    errors and a hint for near misses."""
    if app_dir is not None:
        sys.path.insert(0, os.path.abspath(app_dir))
    file_part, colon, file_attr = import_path.partition(":")
    if file_part.endswith(".py"):
        return _import_file(file_part, file_attr if colon else None)
    if ":" in import_path:
        module_name, _, attr = import_path.partition(":")
    else:
        module_name, _, attr = import_path.rpartition(".")
    if os.sep in file_part and os.path.isfile(file_part + ".py"):
        raise CLIError(f"bad import path {import_path!r}: did you mean {file_part}.py?")
    if not module_name or not attr:
        raise CLIError(f"bad import path {import_path!r}: expected MODULE:ATTRIBUTE, "
                       "e.g. my_app:app")
    module = _import_module(module_name, import_path)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"module {module_name!r} has no attribute {attr!r}"
                           f"{_near_miss(module, module_name, attr)}")
        obj = getattr(obj, part)
    return obj


def _import_module(module_name: str, import_path: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CLIError(f"cannot import module {module_name!r} (from {import_path!r}): "
                           f"no such module; check the path or pass --app-dir") from None
        raise CLIError(f"importing module {module_name!r} failed: {exc}") from None
    except Exception as exc:
        raise CLIError(f"importing module {module_name!r} raised "
                       f"{type(exc).__name__}: {exc}") from None


def _applications(module: Any) -> list[str]:
    from fleet._deployment import Application
    return sorted(n for n, v in vars(module).items()
                  if isinstance(v, Application) and not n.startswith("_"))


def _near_miss(module: Any, module_name: str, attr: str) -> str:
    """A hint when ``pkg.mod`` was meant as a module, or the module defines other apps."""
    candidates: list[str] = []
    try:
        sub = importlib.import_module(f"{module_name}.{attr}")
    except Exception:
        sub = None
    if sub is not None:
        candidates = [f"{module_name}.{attr}:{n}" for n in _applications(sub)]
    if not candidates:
        apps = _applications(module)
        apps = difflib.get_close_matches(attr, apps, n=1, cutoff=0.6) or apps
        candidates = [f"{module_name}:{n}" for n in apps]
    if not candidates:
        return ""
    return f"; did you mean {' or '.join(candidates)}?"


def _import_file(path: str, attr: str | None) -> Any:
    """Import a Python file with its directory on sys.path; without attr, its only
    Application."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise CLIError(f"no such file {path!r}")
    directory, filename = os.path.split(full)
    sys.path.insert(0, directory)
    module_name = filename[:-3]
    module = _import_module(module_name, path)
    if getattr(module, "__file__", None) and \
            os.path.realpath(module.__file__) != os.path.realpath(full):
        raise CLIError(f"importing {path!r} found another module named {module_name!r} at "
                       f"{module.__file__}; rename the file or use MODULE:ATTR with --app-dir")
    if attr:
        if not hasattr(module, attr):
            raise CLIError(f"{path!r} has no attribute {attr!r}"
                           f"{_near_miss(module, module_name, attr)}")
        return getattr(module, attr)
    apps = _applications(module)
    if len(apps) == 1:
        return getattr(module, apps[0])
    if not apps:
        raise CLIError(f"{path!r} defines no fleet Application; bind one "
                       "(app = MyDeployment.bind()) or name a builder as FILE:ATTR")
    raise CLIError(f"{path!r} defines {len(apps)} applications ({', '.join(apps)}); pick "
                   f"one, e.g. {path}:{apps[0]}")


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
            new._legacy_refs = value._legacy_refs
            seen[id(value)] = new
            return new
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple):
            return tuple(walk(v) for v in value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    result = walk(app)
    names = {v.deployment.name for v in seen.values() if isinstance(v, Application)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"the config overrides deployment(s) {', '.join(map(repr, unknown))}, "
                         f"which the application does not have; its deployments are "
                         f"{', '.join(map(repr, sorted(names)))}")
    return result


def load_config(path: str) -> FleetConfig:
    """Read and validate a YAML config; every problem is one line naming file and line."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise CLIError(f"cannot read config {path!r}: {exc.strerror}") from None
    import yaml  # only configs need it: not imported on `fleet run module:app`
    try:
        raw = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CLIError(f"config {path!r}{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise CLIError(f"config {path!r}: expected a mapping of options at the top, got "
                       f"{type(raw).__name__}")
    try:
        return FleetConfig(**raw)
    except ValidationError as exc:
        problems = [f"config {path!r}{_yaml_line(root, loc)}: {text}"
                    for loc, text in describe_errors(exc)]
        raise CLIError("; ".join(problems)) from None


def _yaml_line(node: Any, loc: tuple[Any, ...]) -> str:
    """``, line N`` of the YAML node at loc (the key's line for a mapping entry)."""
    import yaml
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    line, node = key.start_mark.line, value
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line
        else:
            break
    return f", line {line + 1}" if line is not None else ""


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
@click.option("--reload", is_flag=True, help="Redeploy what changed when the application's "
              "files change.")
def run(target: str, app_dir: str | None, name: str | None, route_prefix: str | None,
        host: str | None, port: int | None, grpc_port: int | None, dev: bool,
        reload: bool) -> None:
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
        inst = start_owned(config.http_options, config.grpc_options)
        for app_cfg, app in apps:
            try:
                deploy(app, name=app_cfg.name, route_prefix=app_cfg.route_prefix,
                       progress=True)
            except (TypeError, ValueError) as exc:
                raise CLIError(str(exc)) from None
        if config.traffic:
            from fleet._api import _apply_traffic
            try:
                _apply_traffic(config.traffic)
            except (TypeError, ValueError) as exc:
                raise CLIError(str(exc)) from None
        stop.serving()
        _print_serving(instance_status())
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
        overrides = {d.name: d.overrides() for d in app_cfg.deployments}
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


def _print_serving(status: dict[str, Any]) -> None:
    from fleet._api import _print_addresses
    _print_addresses(status)
    proxies = status.get("proxies", {})
    http, grpc = proxies.get("http"), proxies.get("grpc")
    if http:
        click.echo(f"fleet: HTTP on http://{http['host']}:{http['port']}", err=True)
    if grpc:
        click.echo(f"fleet: gRPC on {grpc['host']}:{grpc['port']}", err=True)
    click.echo("fleet: press Ctrl-C to stop", err=True)


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
        import yaml
        click.echo(yaml.safe_dump(result, sort_keys=False).rstrip())


def main() -> None:
    """Console entry point."""
    cli()
