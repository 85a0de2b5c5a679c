"""The observation commands: ``fleet top``, ``fleet metrics`` and ``fleet logs``.

They reach the running instance's controller through the instance file in the user's
runtime directory (the controller's socket and secret); ``fleet logs`` then reads the
instance's log files itself, so it shows what came before it started. ``fleet top`` and
``fleet metrics`` given an address (``--address``, ``FLEET_ADDRESS``, ``--ray-address``,
``RAY_ADDRESS``) ask the management API there instead, as ``fleet status`` does.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import click

from fleet._manage.commands import address_option, call, connect, get, token_option


class ObserveError(click.ClickException):
    """A one-line error; exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"fleet: error: {self.message}", err=True)


def _instance() -> tuple[str, bytes]:
    from fleet import _rundir
    from fleet.exceptions import FleetError
    try:
        found = _rundir.live_instances()
    except FleetError as exc:
        raise ObserveError(str(exc)) from None
    if not found:
        raise ObserveError("no fleet instance is running on this machine for this user "
                           "(start one with `fleet run`)")
    path, info = found[0]
    if len(found) > 1:
        click.echo(f"fleet: {len(found)} instances are running; talking to the newest, "
                   f"pid {info['pid']} ({path})", err=True)
    try:
        return str(info["address"]), bytes.fromhex(info["secret"])
    except (KeyError, ValueError, TypeError):
        raise ObserveError(f"the instance file {path} is malformed") from None


async def _call_async(method: str, *args: Any) -> Any:
    from fleet._runtime import Runtime
    address, secret = _instance()
    rt = Runtime(asyncio.get_running_loop(), address, secret)
    try:
        await rt.connect_controller(subscribe=False)
    except OSError as exc:
        raise ObserveError(f"cannot reach the fleet instance recorded on this machine: "
                           f"{exc}") from None
    try:
        return await rt.call_controller(method, *args)
    finally:
        if rt.controller is not None:
            rt.controller.close()


def _call(method: str, *args: Any) -> Any:
    """One call to the running instance's controller (``Controller.rpc_<method>``)."""
    return asyncio.run(_call_async(method, *args))


TOP_COLUMNS = (("APPLICATION", "application", 14), ("DEPLOYMENT", "deployment", 18),
               ("STATUS", "status", 13), ("REQ/S", "requests_per_s", 9),
               ("P50 MS", "p50_s", 8), ("P90 MS", "p90_s", 8), ("P99 MS", "p99_s", 8),
               ("ERR%", "error_rate", 6), ("ONGOING", "ongoing", 8), ("QUEUED", "queued", 7),
               ("REPLICAS", "replicas", 9))


def _top_cell(row: dict[str, Any], key: str) -> str:
    if key == "replicas":
        return f"{row['running_replicas']}/{row['target_replicas']}"
    value = row.get(key)
    if value is None:
        return "-"
    if key.endswith("_s") and key.startswith("p"):
        return f"{value * 1000:.2f}"
    if key == "error_rate":
        return f"{value * 100:.1f}"
    if key == "requests_per_s":
        return f"{value:.1f}"
    return str(value)


def top_table(rows: list[dict[str, Any]], window: float) -> str:
    """fleet top's table: one line per deployment."""
    head = " ".join(f"{title:<{width}}" for title, _, width in TOP_COLUMNS)
    lines = [f"fleet top: last {window:g}s, {time.strftime('%H:%M:%S')}", head]
    for row in rows:
        lines.append(" ".join(f"{_top_cell(row, key)[:width]:<{width}}"
                              for _, key, width in TOP_COLUMNS))
    if not rows:
        lines.append("(no deployments)")
    return "\n".join(line.rstrip() for line in lines)


def _through_api(address: str | None) -> bool:
    """Whether an address names the instance: then its management API answers."""
    ctx = click.get_current_context(silent=True)
    ray_address = ctx.meta.get("fleet.ray_address") if ctx is not None else None
    return bool(address or os.environ.get("FLEET_ADDRESS") or ray_address
                or os.environ.get("RAY_ADDRESS"))


@click.command()
@click.option("--once", is_flag=True, help="Print one table and exit (for scripts and "
              "terminals that are not TTYs).")
@click.option("--window", default=60.0, type=click.FloatRange(1, 86400), show_default=True,
              help="Seconds the figures cover.")
@address_option
@token_option
def top(once: bool, window: float, address: str | None, token: str | None) -> None:
    """A live table of every deployment: requests/s, latency percentiles, errors,
    ongoing and queued calls, replicas; refreshed every second."""
    if _through_api(address):
        with connect(address, token) as client:
            _top(once, window, lambda: list(get(client, "/api/top",
                                                params={"window": window})["rows"]))
        return
    _top(once, window, lambda: list(_call("top", window)))


def _top(once: bool, window: float, rows_now: Any) -> None:
    rows = rows_now()
    if once or not sys.stdout.isatty():
        click.echo(top_table(rows, window))
        return
    try:
        while True:
            click.echo("\x1b[H\x1b[2J" + top_table(rows, window), nl=True)
            time.sleep(1.0)
            rows = rows_now()
    except KeyboardInterrupt:
        pass


@click.command()
@address_option
@token_option
def metrics(address: str | None, token: str | None) -> None:
    """Print every metric of the running instance in Prometheus' text format."""
    if _through_api(address):
        with connect(address, token) as client:
            click.echo(call(client, "GET", "/metrics").text, nl=False)
        return
    click.echo(_call("metrics_text"), nl=False)


def _log_line(line: dict[str, Any]) -> str:
    who = "/".join(p for p in (line.get("application"), line.get("deployment")) if p)
    rep = line.get("replica") or line.get("logger", "")
    rid = f" id={line['request_id']}" if line.get("request_id") else ""
    stamp = str(line.get("timestamp", ""))
    return f"{stamp} {line.get('level', '')} {who or 'system'} {rep}{rid}: " \
           f"{line.get('message', '')}"


@click.command()
@click.argument("target", required=False, default="")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("--since", default=None, help="Only lines newer than this: 90, 90s, 10m, 2h.")
@click.option("--grep", default=None, help="Only lines whose message contains this text.")
@click.option("--request-id", default=None, help="Only lines of this request.")
@click.option("--system", is_flag=True, help="The proxies' and the controller's lines "
              "instead of the replicas'.")
@click.option("--limit", default=1000, type=click.IntRange(1, 10000), show_default=True,
              help="At most this many past lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON lines as they are.")
def logs(target: str, follow: bool, since: str | None, grep: str | None,
         request_id: str | None, system: bool, limit: int, as_json: bool) -> None:
    """Print the log lines of TARGET: APP, APP/DEPLOYMENT or APP/DEPLOYMENT/REPLICA
    (every replica's when left out), from the instance's log files."""
    from fleet import _logs
    parts = [p for p in target.split("/")] if target else []
    if len(parts) > 3 or any(not p for p in parts):
        raise ObserveError(f"TARGET is APP, APP/DEPLOYMENT or APP/DEPLOYMENT/REPLICA, "
                       f"not {target!r}")
    app, dep, rep = (parts + [None, None, None])[:3]
    try:
        seconds = _logs.parse_since(since) if since else None
    except ValueError as exc:
        raise ObserveError(str(exc)) from None
    directory = _call("logs_dir")
    if not directory:
        raise ObserveError("this instance writes no log files (its log directory could not "
                       "be made; see its console)")
    show = (lambda ln: json.dumps(ln)) if as_json else _log_line
    for line in _logs.read(directory, app, dep, rep, system, seconds, grep, request_id,
                           limit):
        click.echo(show(line))
    if not follow:
        return
    tail = _logs.follow(directory, app, dep, rep, system, grep, request_id)
    try:
        while True:
            for line in next(tail):
                click.echo(show(line))
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


COMMANDS = [top, metrics, logs]
