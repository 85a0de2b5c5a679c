"""How the ``fleet`` command finds an instance and talks to its management API.

The instance is found in this order, the first source present winning: ``--address``,
``FLEET_ADDRESS``, ``--ray-address`` or ``RAY_ADDRESS`` (the instance that published
itself on that Ray cluster), the instance files in the user's private runtime directory
(the newest live one), and the default address 127.0.0.1:8100. The token comes from
``--token``, else ``FLEET_TOKEN``, else the instance file of the instance at that address
(or what it published on Ray).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx

from fleet._config import DEFAULT_MANAGEMENT_PORT

DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_MANAGEMENT_PORT}"
TIMEOUT_S = 30.0


class ClientError(Exception):
    """One line for the user (the CLI prints it as ``fleet: error: ...``)."""


@dataclass
class Target:
    """Where the instance is, how it was found, and its token."""

    url: str
    source: str
    token: str | None
    verify: bool | str = True
    pid: int | None = None


def split_address(address: str, where: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); one-line error otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ClientError(f"{where} {address!r} is not HOST:PORT (e.g. 127.0.0.1:8100)")
    return host, int(port)


def _files() -> list[tuple[str, dict[str, Any]]]:
    from fleet import _rundir
    from fleet.exceptions import FleetError
    try:
        found = _rundir.live_instances()
    except FleetError as exc:
        raise ClientError(str(exc)) from None
    return [(path, info) for path, info in found if isinstance(info.get("management"), dict)]


def _url(scheme: str, host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def find(address: str | None = None, token: str | None = None,
         say: Any = None, ray_address: str | None = None) -> Target:
    """The instance to talk to (see the module's docstring); say(line) reports a choice
    among several live instances."""
    token = token or os.environ.get("FLEET_TOKEN") or None
    ca = os.environ.get("FLEET_CA_FILE")
    chosen: str | None = None
    source = ""
    if address:
        chosen, source = address, "--address"
    elif os.environ.get("FLEET_ADDRESS"):
        chosen, source = os.environ["FLEET_ADDRESS"], "FLEET_ADDRESS"
    elif ray_address or os.environ.get("RAY_ADDRESS"):
        return _on_ray(ray_address or os.environ["RAY_ADDRESS"],
                       "--ray-address" if ray_address else "RAY_ADDRESS", token, ca)
    files = _files()
    if chosen is not None:
        host, port = split_address(chosen, source)
        for _path, info in files:       # a local instance at that address: its token
            m = info["management"]
            if int(m["port"]) == port and (m["host"] == host or host in (
                    "127.0.0.1", "localhost")):
                return Target(_url(m.get("scheme", "http"), host, port), source,
                              token or info.get("token"), ca or False, int(info["pid"]))
        scheme = "https" if ca else "http"
        return Target(_url(scheme, host, port), source, token, ca or True)
    if files:
        path, info = files[0]
        if len(files) > 1 and say is not None:
            others = ", ".join(str(i["pid"]) for _, i in files[1:])
            say(f"{len(files)} instances are running; talking to the newest, pid "
                f"{info['pid']} ({path}); the others are pids {others} (pick one with "
                "--address)")
        m = info["management"]
        return Target(_url(m.get("scheme", "http"), m["host"], int(m["port"])),
                      "instance file", token or info.get("token"), ca or False,
                      int(info["pid"]))
    host, port = split_address(DEFAULT_ADDRESS, "default address")
    return Target(_url("http", host, port), "default", token, ca or True)


def _on_ray(address: str, source: str, token: str | None, ca: str | None) -> Target:
    """The instance that published itself on the Ray cluster at address."""
    from fleet._backends.ray import find_instance
    from fleet.exceptions import FleetError
    try:
        info = find_instance(address)
    except FleetError as exc:
        raise ClientError(str(exc)) from None
    m = info["management"]
    return Target(_url(m.get("scheme", "http"), m["host"], int(m["port"])), source,
                  token or info.get("token"), ca or False, int(info["pid"]))


class Client:
    """Blocking calls to the management API with one-line errors."""

    def __init__(self, target: Target) -> None:
        self.target = target
        headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
        self.http = httpx.Client(base_url=target.url, headers=headers, timeout=TIMEOUT_S,
                                 verify=target.verify)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            if self.target.source == "default":
                raise ClientError(f"no fleet instance is running (nothing answers at "
                                  f"{self.target.url}); start one with `fleet start`"
                                  ) from None
            raise ClientError(f"nothing answers at {self.target.url} (from "
                              f"{self.target.source}); is the instance running? Start one "
                              "with `fleet start`") from None
        except httpx.HTTPError as exc:
            raise ClientError(f"talking to {self.target.url} failed: "
                              f"{type(exc).__name__}: {exc}") from None
        if r.status_code == 401 and self.target.source == "default":
            raise ClientError(f"no fleet instance is running for you here (what answers at "
                              f"{self.target.url} refused the request without a token); "
                              "start one with `fleet start`, or pass --address and --token")
        if r.status_code == 401:
            hint = ("pass --token or set FLEET_TOKEN" if not self.target.token
                    else "the token given is not this instance's")
            raise ClientError(f"the instance at {self.target.url} refused the request: it "
                              f"needs its token ({hint})")
        if r.status_code >= 400:
            raise ClientError(_error_text(r))
        return r

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
        text = str(body.get("error") or body)
    except ValueError:
        text = r.text.strip()[:500] or r.reason_phrase
    return text
