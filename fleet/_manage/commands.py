"""The ``fleet`` commands that operate a running instance through its management API:
start, shutdown, status, apply, config, history and rollback."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import click

from fleet._imports import CLIError, apply_backend_options, backend_options, load_config

if TYPE_CHECKING:       # httpx is imported by the commands that talk to an instance
    from fleet._config import FleetConfig
    from fleet._manage.client import Client

START_TIMEOUT_S = 120.0
# The background instance's output file (its processes' stdout and stderr, access logs
# included) is cut back to empty when it passes this size.
MAX_LOG_BYTES = 16 << 20
WAIT_TIMEOUT_S = 600.0

address_option = click.option("--address", default=None, metavar="HOST:PORT",
                              help="The instance's management address (default: "
                                   "FLEET_ADDRESS, else the newest instance of yours on "
                                   "this machine, else 127.0.0.1:8100).")
_token_option = click.option("--token", default=None, help="The instance's token (default: "
                             "FLEET_TOKEN, else read from the runtime directory).")


def _remember_ray_address(ctx: click.Context, _param: Any, value: str | None) -> None:
    ctx.meta["fleet.ray_address"] = value


_ray_lookup_option = click.option(
    "--ray-address", default=None, expose_value=False, callback=_remember_ray_address,
    help="Find the instance on this Ray cluster (default: RAY_ADDRESS), after --address "
         "and FLEET_ADDRESS.")


def token_option(fn: Any) -> Any:
    """--token and --ray-address, for every command that talks to a running instance."""
    return _token_option(_ray_lookup_option(fn))


def _say(line: str) -> None:
    click.echo(f"fleet: {line}", err=True)


def connect(address: str | None, token: str | None) -> Client:
    from fleet._manage.client import Client, ClientError, find
    ctx = click.get_current_context(silent=True)
    ray_address = ctx.meta.get("fleet.ray_address") if ctx is not None else None
    try:
        return Client(find(address, token, say=_say, ray_address=ray_address))
    except ClientError as exc:
        raise CLIError(str(exc)) from None


def call(client: Client, method: str, path: str, **kwargs: Any) -> Any:
    from fleet._manage.client import ClientError
    try:
        return client.request(method, path, **kwargs)
    except ClientError as exc:
        raise CLIError(str(exc)) from None


def get(client: Client, path: str, **kwargs: Any) -> Any:
    return call(client, "GET", path, **kwargs).json()


# -- start / shutdown -------------------------------------------------------------------

@click.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--host", default=None, help="HTTP host (default: 127.0.0.1).")
@click.option("--port", default=None, type=int, help="HTTP port (default: 8000).")
@click.option("--grpc-port", default=None, type=int, help="Also serve gRPC on this port.")
@click.option("--address", default=None, metavar="HOST:PORT",
              help="Where the management API listens (default: 127.0.0.1:8100; "
                   "0.0.0.0:PORT listens everywhere).")
@click.option("--max-log-bytes", default=MAX_LOG_BYTES, type=click.IntRange(min=4096),
              hidden=True, help="Cut the instance's log file back past this size.")
@backend_options
def start(config_file: str | None, host: str | None, port: int | None,
          grpc_port: int | None, address: str | None, max_log_bytes: int,
          backend: str | None, ray_address: str | None, proxy_location: str | None) -> None:
    """Start an instance in the background; returns once it serves. Deploy with
    `fleet apply`, stop with `fleet shutdown`. With --backend ray the instance's
    controller is a detached actor of the cluster (fleet-controller): nothing of it runs
    on this machine, Ray restarts it if it dies, and it recovers its applications.

    With CONFIG_FILE (a fleet.yaml), the instance starts with the file's http_options,
    grpc_options, logging_config, backend and proxy_location (the flags given win), and
    the file's applications are then applied as `fleet apply CONFIG_FILE` does."""
    from fleet import _rundir
    from fleet._config import DEFAULT_MANAGEMENT_PORT
    from fleet._manage.client import ClientError, split_address
    from fleet._manage.server import bind
    for flag, value in (("--port", port), ("--grpc-port", grpc_port)):
        if value is not None and not 0 <= value <= 65535:
            raise CLIError(f"{flag} must be a port number from 0 to 65535, got {value}")
    config_path = None
    if config_file is not None:
        # its errors before anything starts (its warnings come with the apply below)
        config = load_config(config_file, warn=False)
        apply_backend_options(config, backend, ray_address, proxy_location)
        backend, ray_address = config.backend, config.ray_address
        proxy_location = config.proxy_location
        config_path = os.path.abspath(config_file)
    elif ray_address is not None and backend != "ray":
        raise CLIError("--ray-address applies to --backend ray only")
    mhost, mport = ("127.0.0.1", DEFAULT_MANAGEMENT_PORT)
    if address is not None:
        try:
            mhost, mport = split_address(address, "--address")
        except ClientError as exc:
            raise CLIError(str(exc)) from None
    try:
        if backend != "ray":        # on Ray it listens on the controller's node
            bind(mhost, mport, fallback=False).close()
    except OSError as exc:
        try:
            mine = [info["pid"] for _, info in _rundir.live_instances()
                    if (info.get("management") or {}).get("port") == mport]
        except Exception:       # an unsafe runtime directory is reported below anyway
            mine = []
        hint = f" (a fleet instance of yours runs there, pid {mine[0]})" if mine else ""
        raise CLIError(f"{exc}{hint}") from None
    try:
        directory = _rundir.runtime_dir()
    except Exception as exc:
        raise CLIError(str(exc)) from None
    log_path = os.path.join(directory, f"start-{time.strftime('%Y%m%dT%H%M%S')}-"
                                       f"{os.getpid()}.log")
    args = {"host": host, "port": port, "grpc_port": grpc_port, "log": log_path,
            "max_log_bytes": max_log_bytes,
            "management": {"host": mhost, "port": mport},
            "backend": backend or "local", "ray_address": ray_address,
            "proxy_location": proxy_location or "EveryNode", "config": config_path}
    if backend == "ray":
        # the controller is a detached actor of the cluster: nothing runs here
        found = _start_on_cluster(args)
        if "error" in found:
            raise CLIError(str(found["error"]))
        what = "started instance" if found.get("created") else \
            "a fleet instance already runs on the Ray cluster: instance"
        _say(f"{what} pid {found['pid']}; the detached actor fleet-controller on "
             f"node {found.get('node')} of the Ray cluster; HTTP on "
             f"{found.get('http') or '-'}; management API at {found['management']['url']}")
        _say(f"dashboard: {found['management']['url']}/?token={found['token']}")
        if config_file is not None:
            ctx = click.get_current_context()
            ctx.invoke(apply, config_file=config_file, token=found["token"],
                       address=found["management"]["url"].split("://", 1)[1].rstrip("/"))
        return
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    read_end, write_end = os.pipe()
    try:
        # A session of its own, no terminal, nothing of this shell: it outlives this command
        # and stops only on `fleet shutdown` (or a signal to its pid).
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet", "_daemon", json.dumps(args), str(write_end)],
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, pass_fds=(write_end,),
            start_new_session=True, close_fds=True)
    finally:
        os.close(write_end)
        os.close(log_fd)
    try:
        message = _read_ready(read_end, proc)
    finally:
        os.close(read_end)
    if "error" in message:
        raise CLIError(f"{message['error']} (log: {log_path})")
    _say(f"started instance pid {proc.pid}; HTTP on {message.get('http', '-')}; "
         f"management API at {message['url']} (log: {log_path})")
    _say(f"dashboard: {message['dashboard']}")
    if config_file is not None:
        ctx = click.get_current_context()
        ctx.invoke(apply, config_file=config_file,
                   address=message["url"].split("://", 1)[1].rstrip("/"))


def _read_ready(fd: int, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The one JSON line the background instance writes when it serves (or fails)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    data = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\n"):
                break
    if data.strip():
        try:
            return dict(json.loads(data))
        except ValueError:
            pass
    if proc.poll() is None:
        proc.kill()
        return {"error": f"the instance did not start within {START_TIMEOUT_S:g} s"}
    return {"error": f"the instance exited with code {proc.returncode} while starting"}


@click.command("_daemon", hidden=True)
@click.argument("args")
@click.argument("ready_fd", type=int)
def daemon(args: str, ready_fd: int) -> None:
    """The background instance of `fleet start` (not for direct use)."""
    import logging

    from fleet._api import StopSignals, shutdown, start_owned
    from fleet._config import ManagementOptions
    from fleet._logformat import DATEFMT, log_format
    from fleet.exceptions import FleetError
    logging.basicConfig(level=logging.WARNING, datefmt=DATEFMT, format=log_format("driver"))
    opts = json.loads(args)
    http, grpc, logging_config = _instance_options(opts)
    stop = StopSignals()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def tell(message: dict[str, Any]) -> None:
        try:
            os.write(ready_fd, (json.dumps(message) + "\n").encode())
            os.close(ready_fd)
        except OSError:
            pass
    try:
        inst = start_owned(http, grpc, ManagementOptions(**opts["management"]),
                           extra_info={"background": True, "log": opts.get("log")},
                           backend=opts.get("backend", "local"),
                           ray_address=opts.get("ray_address"),
                           proxy_location=opts.get("proxy_location", "EveryNode"),
                           logging_config=logging_config)
    except (FleetError, KeyboardInterrupt, ValueError) as exc:
        tell({"error": str(exc)})
        shutdown()
        sys.exit(1)
    stop.serving()
    proxies = inst.controller.proxies if inst.controller is not None else {}
    http_info = proxies.get("http")
    tell({"url": inst.ops.url(), "dashboard": inst.dashboard_url(),
          "http": (f"{http_info.get('scheme', 'http')}://{http_info['host']}:"
                   f"{http_info['port']}" if http_info else None)})
    try:
        while not stop.event.wait(0.5):
            if inst.closed:
                break
            _bound_log(opts.get("log"), int(opts.get("max_log_bytes") or MAX_LOG_BYTES))
    finally:
        shutdown()
        # A shutdown asked for over the API runs in a daemon thread of its own; wait for
        # it to finish, else leaving here ends it before it removes the instance file.
        inst.stopped.wait(120)


def _instance_options(opts: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The HTTP, gRPC and logging options `fleet start` gives its instance: the config
    file's (it was checked), then the flags."""
    from fleet._config import GRPCOptions, HTTPOptions
    http = HTTPOptions()
    grpc = GRPCOptions()
    logging_config = None
    if opts.get("config"):
        # its applications come through the API afterwards
        config = load_config(opts["config"], warn=False)
        http, grpc, logging_config = config.http_options, config.grpc_options, \
            config.logging_config
        if grpc.grpc_servicer_functions:
            grpc.enabled = True
    if opts.get("host") is not None:
        http.host = opts["host"]
    if opts.get("port") is not None:
        http.port = opts["port"]
    if opts.get("grpc_port") is not None:
        grpc.port, grpc.enabled = opts["grpc_port"], True
    return http, grpc, logging_config


def _start_on_cluster(opts: dict[str, Any]) -> dict[str, Any]:
    """`fleet start --backend ray`: the cluster's detached controller, made (or found)
    from this process, which then leaves; {"error": ...} when it cannot start."""
    from fleet._api import start_detached
    from fleet._config import ManagementOptions
    from fleet.exceptions import FleetError
    http, grpc, logging_config = _instance_options(opts)
    try:
        return start_detached(http, grpc, ManagementOptions(**opts["management"]),
                              logging_config, opts.get("ray_address"),
                              opts.get("proxy_location") or "EveryNode")
    except (FleetError, ValueError) as exc:
        return {"error": str(exc)}


def _bound_log(path: str | None, limit: int) -> None:
    """Cut the log back to empty past limit bytes. Every process of the instance writes
    it with O_APPEND, so their next lines go to the new end."""
    if not path:
        return
    try:
        if os.path.getsize(path) > limit:
            os.truncate(path, 0)
            sys.stderr.write(f"fleet: the log passed {limit} bytes and was cut back\n")
            sys.stderr.flush()
    except OSError:
        pass


@click.command()
@click.option("-y", "--yes", is_flag=True, hidden=True, help="Accepted and ignored.")
@address_option
@token_option
def shutdown(yes: bool, address: str | None, token: str | None) -> None:
    """Stop the instance and every process it started (no prompt)."""
    import psutil
    with connect(address, token) as client:
        pid = int(get(client, "/api/instance")["pid"])
        call(client, "POST", "/api/instance/shutdown")
    deadline = time.monotonic() + 60
    while True:
        try:     # gone, or exited and not yet reaped by its parent (a shell, say)
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        if time.monotonic() > deadline:
            raise CLIError(f"the instance (pid {pid}) did not stop within 60 s")
        time.sleep(0.05)        # another process's exit: nothing to wait on but polling
    _say(f"instance pid {pid} stopped")


# -- status ----------------------------------------------------------------------------

def _snapshot(client: Client) -> dict[str, Any]:
    apps = get(client, "/api/applications")["applications"]
    for app in apps.values():
        for key in ("name", "converged", "revision", "deployed_at"):
            app.pop(key, None)
    instance = get(client, "/api/instance")
    out = {"applications": apps, "proxies": instance["proxies"],
           "traffic": instance.get("traffic", {})}
    if "proxies_by_node" in instance:
        out["proxies_by_node"] = instance["proxies_by_node"]
    return out


def _table(snapshot: dict[str, Any]) -> str:
    rows = [("APPLICATION", "DEPLOYMENT", "STATUS", "REPLICAS", "MESSAGE")]
    for name, app in snapshot["applications"].items():
        rows.append((name, "", app["status"], "", ""))
        for dname, dep in app["deployments"].items():
            running = sum(r["state"] == "RUNNING" for r in dep["replicas"])
            message = (dep.get("message") or "").splitlines()
            rows.append(("", dname, dep["status"], f"{running}/{dep.get('target_replicas')}",
                         message[0][:80] if message else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(_row(r, widths) for r in rows).rstrip()


def _row(cells: tuple[str, ...], widths: list[int]) -> str:
    """Cells padded to widths, the last one as it is."""
    padded = [c.ljust(w) for c, w in zip(cells[:-1], widths, strict=False)]
    return "  ".join([*padded, cells[-1]])


def _render(snapshot: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(snapshot, indent=2)
    if fmt == "table":
        return _table(snapshot)
    import yaml
    return yaml.safe_dump(snapshot, sort_keys=False).rstrip()


@click.command()
@click.option("-o", "--output", "fmt", type=click.Choice(["yaml", "json", "table"]),
              default="yaml", help="Output format (default: yaml).")
@click.option("--json", "as_json", is_flag=True, help="The same as -o json.")
@click.option("--watch", is_flag=True, help="Print a fresh snapshot every second.")
@address_option
@token_option
def status(fmt: str, as_json: bool, watch: bool, address: str | None,
           token: str | None) -> None:
    """Show applications, deployments and replicas of the running instance."""
    if as_json:
        fmt = "json"
    with connect(address, token) as client:
        if not watch:
            click.echo(_render(_snapshot(client), fmt))
            return
        tty = sys.stdout.isatty()
        # Ctrl-C (SIGINT) sets a flag rather than raising wherever the main thread is:
        # an interrupt inside the HTTP client's pool could leave its lock held, and
        # closing the client would then wait for ever
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        while not stop.is_set():
            text = _render(_snapshot(client), fmt)
            if tty:
                click.echo("\x1b[H\x1b[2J", nl=False)
            else:
                click.echo(f"--- {time.strftime('%H:%M:%S')}")
            click.echo(text, nl=True)
            sys.stdout.flush()
            stop.wait(1.0)          # the refresh period, not a synchronisation


# -- apply --------------------------------------------------------------------------

# Deployment options a change of which applies to running replicas (no restart).
IN_PLACE = frozenset({"num_replicas", "user_config", "autoscaling_config",
                      "logging_config"})


def _app_configs(path: str, config: FleetConfig) -> list[dict[str, Any]]:
    out = []
    for app in config.applications:
        d = app.model_dump(mode="json", exclude_defaults=True)
        d["name"], d["import_path"] = app.name, app.import_path
        out.append(d)
    names = [a["name"] for a in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CLIError(f"config {path!r} names application(s) {', '.join(dupes)} more than "
                       "once; give each a unique name")
    return out


def options_not_applied(config: FleetConfig, live: dict[str, Any]) -> list[str]:
    """The file's http_options/grpc_options keys that differ from the running instance's:
    fleet apply changes applications only, so they would be silently left out."""
    from fleet._config import GRPCOptions, HTTPOptions
    out: list[str] = []
    for key, options, default in (("http_options", config.http_options, HTTPOptions()),
                                  ("grpc_options", config.grpc_options, GRPCOptions())):
        given = options.model_dump(mode="json", include=options.model_fields_set,
                                   exclude={"middlewares", "enabled"})
        if key == "grpc_options":
            if not (config.grpc_options.enabled or config.grpc_options.grpc_servicer_functions):
                continue            # grpc_options alone start no gRPC proxy
            if key not in live:
                out.append("grpc_options (no gRPC proxy runs)")
                continue
        defaults = default.model_dump(mode="json")
        running = live.get(key) or {}
        out += [f"{key}.{k}" for k, v in given.items() if running.get(k, defaults.get(k)) != v]
    return out


def changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[tuple[str, str]]:
    """(what changed, "in place" or "rolling restart") for one application."""
    if old is None:
        return [("new application", "start")]
    out: list[tuple[str, str]] = []
    for key in ("import_path", "args"):
        if old.get(key) != new.get(key):
            out.append((key, "rolling restart"))
    if old.get("route_prefix", "/") != new.get("route_prefix", "/"):
        out.append(("route_prefix", "in place"))
    if old.get("import_path") is None:
        out.append(("deployed from Python before: its code is imported again",
                    "rolling restart"))
    before = {d["name"]: d for d in old.get("deployments", [])}
    after = {d["name"]: d for d in new.get("deployments", [])}
    for name in sorted(set(before) | set(after)):
        b, a = before.get(name, {}), after.get(name, {})
        for key in sorted((set(b) | set(a)) - {"name"}):
            if b.get(key) != a.get(key):
                kind = "in place" if key in IN_PLACE else "rolling restart"
                out.append((f"deployments.{name}.{key}: {_shown(b, key)} -> "
                            f"{_shown(a, key)}", kind))
    return out


def _shown(options: dict[str, Any], key: str) -> str:
    return repr(options[key]) if key in options else "(default)"


def _diff_text(old: Any, new: Any, name: str) -> str:
    import difflib

    import yaml
    a = yaml.safe_dump(old, sort_keys=False).splitlines() if old is not None else []
    b = yaml.safe_dump(new, sort_keys=False).splitlines()
    return "\n".join(difflib.unified_diff(a, b, f"live/{name}", f"file/{name}", lineterm=""))


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--prune", is_flag=True, help="Delete running applications the file does "
                                            "not name.")
@click.option("--dry-run", is_flag=True, help="Print what would change and how; change "
                                              "nothing.")
@click.option("--no-wait", is_flag=True, help="Return once the changes are accepted.")
@click.option("--app-dir", default=None, help="Directory the instance imports the "
                                              "applications from (default: the file's).")
@click.option("--timeout", default=WAIT_TIMEOUT_S, type=float, show_default=True,
              help="Seconds to wait for the changes to finish.")
@address_option
@token_option
def apply(config_file: str, prune: bool, dry_run: bool, no_wait: bool, app_dir: str | None,
          timeout: float, address: str | None, token: str | None) -> None:
    """Deploy the applications CONFIG_FILE names; leave the others running (unless
    --prune). Waits until every change is done, printing progress."""
    config = load_config(config_file)
    wanted = _app_configs(config_file, config)
    app_dir = os.path.abspath(app_dir or os.path.dirname(os.path.abspath(config_file)))
    with connect(address, token) as client:
        live_config = get(client, "/api/config")
        live = {a["name"]: a for a in live_config["applications"]}
        plan = [(a, changes(live.get(a["name"]), a)) for a in wanted]
        not_applied = options_not_applied(config, live_config)
        if not_applied:
            _say(f"{config_file}: not applied, as fleet apply changes applications only: "
                 f"{', '.join(not_applied)} (the running instance's differ); proxy options "
                 f"take effect when an instance starts (`fleet run {config_file}` or "
                 f"`fleet start {config_file}`)")
        doomed = sorted(set(live) - {a["name"] for a in wanted}) if prune else []
        if dry_run:
            for app, what in plan:
                if not what:
                    click.echo(f"application {app['name']!r}: unchanged")
                    continue
                click.echo(f"application {app['name']!r}:")
                diff = _diff_text(live.get(app["name"]), app, app["name"])
                if diff:
                    click.echo(diff)
                for change, kind in what:
                    click.echo(f"  {change}: {kind}")
            for name in doomed:
                click.echo(f"application {name!r}: deleted (--prune)")
            return
        failed: dict[str, str] = {}
        accepted: dict[str, int] = {}
        for app, what in plan:
            body = {k: v for k, v in app.items()}
            r = _put(client, app["name"], body, app_dir)
            if isinstance(r, str):
                failed[app["name"]] = r
                _say(f"application {app['name']!r} FAILED: {r}")
                continue
            accepted[app["name"]] = r
            kinds = sorted({k for _, k in what}) or ["unchanged"]
            _say(f"application {app['name']!r}: revision {r} accepted ({', '.join(kinds)})")
        for name in doomed:
            call(client, "DELETE", f"/api/applications/{name}")
            _say(f"application {name!r}: deleting (--prune)")
        if not no_wait:
            failed.update(wait_converged(client, list(accepted), timeout))
    if failed:
        raise CLIError(f"{len(failed)} application(s) failed: "
                       + "; ".join(f"{n}: {m.splitlines()[0] if m else ''}"
                                   for n, m in failed.items()))


def _put(client: Client, name: str, body: dict[str, Any], app_dir: str) -> int | str:
    """PUT one application: its revision, or the error text when the instance refused it
    (an import that failed, a conflict)."""
    from fleet._manage.client import ClientError
    try:
        r = client.request("PUT", f"/api/applications/{name}", json=body,
                           params={"app_dir": app_dir})
    except ClientError as exc:
        text = str(exc)
        if "refused the request" in text or "nothing answers" in text \
                or "no fleet instance" in text:
            raise CLIError(text) from None
        return text
    return int(r.json()["revision"])


def wait_converged(client: Client, names: list[str], timeout: float) -> dict[str, str]:
    """Wait until each application runs its current revision everywhere, printing each
    deployment's progress; returns the failed ones with their reasons."""
    from fleet._manage.client import ClientError
    failed: dict[str, str] = {}
    todo = set(names)
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while todo and time.monotonic() < deadline:
        for name in sorted(todo):
            try:
                app = client.get(f"/api/applications/{name}")
            except ClientError as exc:
                failed[name] = str(exc)
                todo.discard(name)
                continue
            for dname, dep in app["deployments"].items():
                running = sum(r["state"] == "RUNNING" for r in dep["replicas"])
                line = f"{name}/{dname}: {dep['status']} {running}/{dep['target_replicas']}"
                if seen.get(f"{name}/{dname}") != line:
                    seen[f"{name}/{dname}"] = line
                    _say(line)
            if app["status"] == "DEPLOY_FAILED":
                reasons = [f"{d}: {i['message']}" for d, i in app["deployments"].items()
                           if i["status"] == "DEPLOY_FAILED"]
                failed[name] = "; ".join(reasons)
                _say(f"application {name!r} DEPLOY_FAILED: {failed[name]}")
                todo.discard(name)
            elif app["status"] == "RUNNING" and app.get("converged"):
                _say(f"application {name!r} RUNNING (revision {app['revision']})")
                todo.discard(name)
        if todo:
            time.sleep(0.25)        # polling period of a progress display
    for name in todo:
        failed[name] = f"not done within {timeout:g} s"
    return failed


# -- config, history, rollback ----------------------------------------------------------

@click.command("config")
@click.argument("app", required=False)
@address_option
@token_option
def config_cmd(app: str | None, address: str | None, token: str | None) -> None:
    """Print the live config as YAML (of one application with APP)."""
    with connect(address, token) as client:
        config = get(client, "/api/config")
    if app is not None:
        found = [a for a in config["applications"] if a["name"] == app]
        if not found:
            raise CLIError(f"no application named {app!r}; running: "
                           f"{[a['name'] for a in config['applications']] or 'none'}")
        config = {"applications": found}
    import yaml
    click.echo(yaml.safe_dump(config, sort_keys=False).rstrip())


@click.command()
@click.argument("app")
@address_option
@token_option
def history(app: str, address: str | None, token: str | None) -> None:
    """List an application's revisions, newest last."""
    with connect(address, token) as client:
        revisions = get(client, f"/api/applications/{app}/revisions")["revisions"]
    rows = [("REVISION", "DEPLOYED", "STATUS", "SOURCE")]
    for r in revisions:
        cfg = r.get("config") or {}
        source = cfg.get("import_path") or "python"
        if r.get("note"):
            source += f" ({r['note']})"
        rows.append((str(r["revision"]),
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])),
                     r["status"], source))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo(_row(row, widths))


@click.command()
@click.argument("app")
@click.option("--to", "to", type=int, default=None, help="The revision to deploy again "
                                                         "(default: the previous one).")
@click.option("--no-wait", is_flag=True, help="Return once the rollback is accepted.")
@address_option
@token_option
def rollback(app: str, to: int | None, no_wait: bool, address: str | None,
             token: str | None) -> None:
    """Deploy an earlier revision of APP again."""
    with connect(address, token) as client:
        body = call(client, "POST", f"/api/applications/{app}/rollback",
                    json={} if to is None else {"to": to}).json()
        _say(f"application {app!r}: rolling back as revision {body['revision']}")
        failed = {} if no_wait else wait_converged(client, [app], WAIT_TIMEOUT_S)
    if failed:
        raise CLIError(f"rollback of {app!r} failed: {failed[app]}")


# -- the config file ------------------------------------------------------------------

@click.command()
def schema() -> None:
    """Print the JSON Schema of fleet.yaml, for editors to check files with."""
    from fleet._config import config_schema
    click.echo(json.dumps(config_schema(), indent=2))


@click.command()
@click.argument("targets", nargs=-1, required=True)
@click.option("-o", "--output", default="-", type=click.Path(dir_okay=False, allow_dash=True),
              help="Where to write the config (default: stdout).")
@click.option("--app-dir", default=".", help="Directory to import the applications from.")
def build(targets: tuple[str, ...], output: str, app_dir: str) -> None:
    """Write a complete config for the applications TARGETS (MODULE:ATTR ...): every
    option with its value, which `fleet apply` accepts back unchanged."""
    from fleet._config import FleetConfig, GRPCOptions, HTTPOptions
    from fleet._deployment import build_plans
    from fleet._imports import import_attr, resolve_app
    sys.path.insert(0, os.path.abspath(app_dir))
    applications = []
    names: set[str] = set()
    for target in targets:
        app = resolve_app(import_attr(target), target)
        name = "default" if len(targets) == 1 else target.rpartition(":")[2].rpartition(".")[2]
        if name in names:
            raise CLIError(f"two targets would both be named {name!r}; build them apart")
        names.add(name)
        deployments = []
        for plan in build_plans(app, name):
            options = plan.config.model_dump(mode="json")
            options.pop("name")
            deployments.append({"name": plan.name, **options})
        applications.append({"name": name,
                             "route_prefix": "/" if len(targets) == 1 else f"/{name}",
                             "import_path": target, "args": {},
                             "deployments": deployments})
    config = {"http_options": _every_option(HTTPOptions()),
              "grpc_options": _every_option(GRPCOptions()),
              "applications": applications}
    FleetConfig(**config)           # what is written is read back the same way
    import yaml
    text = yaml.safe_dump(config, sort_keys=False)
    if output == "-":
        click.echo(text.rstrip())
    else:
        with open(output, "w") as f:
            f.write(text)
        _say(f"wrote {output} ({len(applications)} application(s))")


def _every_option(options: Any) -> dict[str, Any]:
    return options.model_dump(mode="json", exclude={"middlewares"})


COMMANDS = [schema, build, start, daemon, shutdown, status, apply, config_cmd, history, rollback]
