"""Importing applications by path (``module:attr``, ``file.py[:attr]``) with one-line
errors, calling builders with a config's args, applying per-deployment overrides, and
reading a YAML config: shared by the ``fleet`` command and the management server."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
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


def _near_miss(module: Any, module_name: str, attr: str, shown: str | None = None) -> str:
    """A hint when ``pkg.mod`` was meant as a module, or the module defines other apps
    (named ``shown:app``: the path as the user gave it, a file's path say)."""
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
        candidates = [f"{shown or module_name}:{n}" for n in apps]
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
                           f"{_near_miss(module, module_name, attr, shown=path)}")
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


def load_config(path: str, warn: bool = True) -> FleetConfig:
    """Read and validate a YAML config; every problem is one line naming file and line.
    With warn, one line on stderr names the Ray Serve keys it has that fleet ignores."""
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
        config = FleetConfig(**raw)
    except ValidationError as exc:
        problems = [f"config {path!r}{_yaml_line(root, loc)}: {text}"
                    for loc, text in describe_errors(exc)]
        raise CLIError("; ".join(problems)) from None
    ignored = config.ignored_keys() if warn else []
    if ignored:
        click.echo(f"fleet: warning: config {path!r}: fleet ignores these Ray Serve keys: "
                   f"{', '.join(ignored)}", err=True)
    return config


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


def deployments_in(app: Any) -> dict[str, Any]:
    """Every deployment bound in an application's graph, by name."""
    from fleet._deployment import Application
    from fleet.dag import MethodNode
    names: dict[str, Any] = {}
    seen: set[int] = set()

    def walk(value: Any) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, MethodNode):
            walk(value.app)
            walk(value.args)
            walk(value.kwargs)
        elif isinstance(value, Application):
            dep = value.deployment
            names[dep.name] = dep
            walk(value.args)
            walk(value.kwargs)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    walk(app)
    return names


def config_overrides(app: Any, config: Any) -> dict[str, dict[str, Any]]:
    """An application config's per-deployment overrides, with its ``logging_config``
    given to every deployment that sets none of its own (in code or in the config), and
    its ``runtime_env`` under every deployment's own (see merge_runtime_env)."""
    from fleet._config import merge_runtime_env
    overrides = {d.name: d.overrides() for d in config.deployments}
    logging_config = getattr(config, "logging_config", None)
    runtime_env = getattr(config, "runtime_env", None)
    for name, dep in deployments_in(app).items():
        if logging_config is not None and dep.config.logging_config is None:
            overrides.setdefault(name, {}).setdefault("logging_config",
                                                      logging_config.model_dump())
        if runtime_env:
            mine = overrides.setdefault(name, {})
            actor = dict(mine.get("ray_actor_options") or dep.config.ray_actor_options or {})
            actor["runtime_env"] = merge_runtime_env(runtime_env, actor.get("runtime_env"))
            mine["ray_actor_options"] = actor
    return overrides


def backend_options(fn: Any) -> Any:
    """--backend, --ray-address and --proxy-location, for every command that starts an
    instance (they override the config's backend, ray_address and proxy_location)."""
    fn = click.option("--proxy-location", default=None,
                      type=click.Choice(["EveryNode", "HeadOnly", "Disabled"]),
                      help="On Ray: a proxy on every node (default), the head only, "
                           "or none.")(fn)
    fn = click.option("--ray-address", default=None,
                      help="The Ray cluster for --backend ray: 'auto', host:port or "
                           "ray://host:10001 (default: RAY_ADDRESS).")(fn)
    fn = click.option("--backend", default=None, type=click.Choice(["local", "ray"]),
                      help="Where replicas run: child processes here (local, the "
                           "default) or actors of a Ray cluster (ray).")(fn)
    return fn


def apply_backend_options(config: Any, backend: str | None, ray_address: str | None,
                          proxy_location: str | None) -> None:
    """Put the backend options of the command line into config."""
    if backend is not None:
        config.backend = backend        # type: ignore[assignment]
    if ray_address is not None:
        config.ray_address = ray_address
    if proxy_location is not None:
        config.proxy_location = proxy_location      # type: ignore[assignment]
    if config.ray_address is not None and config.backend != "ray":
        raise CLIError("--ray-address (ray_address) applies to --backend ray (backend: ray) "
                       "only")
