"""What each fleet process imports: `import fleet` loads no driver code, a replica and
an HTTP proxy load neither pydantic, grpc, psutil, the controller nor the instance code,
and the driver of a plain HTTP app loads no grpc, yaml or psutil. Each check runs in a
fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# (uvicorn's package imports click itself, so the proxy has it whatever fleet does)
HEAVY = ["pydantic", "grpc", "starlette.routing", "fleet._api",
         "fleet._controller.controller", "fleet._cli", "yaml", "psutil"]


def _loaded(*modules: str) -> list[str]:
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    return list(json.loads(out.stdout))


@pytest.mark.parametrize("modules", [
    ("fleet",),
    ("fleet._replica.process", "fleet._replica.replica"),
    ("fleet._proxy.process", "fleet._proxy.http"),
])
def test_child_processes_import_only_what_they_need(modules: tuple[str, ...]) -> None:
    assert _loaded(*modules) == []


def test_public_names_and_submodules_load_on_first_use() -> None:
    code = ("import sys, fleet\n"
            "assert 'fleet._api' not in sys.modules\n"
            "assert callable(fleet.run) and 'fleet._api' in sys.modules\n"
            "assert fleet.dag.InputNode and fleet._serve_request.ServeRequest\n"
            "try:\n    fleet.no_such_name\nexcept AttributeError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "module 'fleet' has no attribute 'no_such_name'"


def test_driver_of_a_plain_app_imports_no_grpc_nor_yaml() -> None:
    # fleet run module:app and fleet.run of an HTTP app: grpc comes with fleet.drivers
    # (a driver or a gRPC ingress imports it), yaml with a config file; once
    # fleet.drivers is loaded, its drivers are still recognised
    code = ("import json, sys, fleet, fleet._api, fleet._cli\n"
            "app = fleet.deployment(lambda: 'ok').bind()\n"
            "prepared = fleet._api._prepare_app(app)\n"
            "print(json.dumps([prepared[1], prepared[3],\n"
            "                  [m for m in ('grpc', 'yaml', 'psutil', 'fleet.drivers')\n"
            "                   if m in sys.modules]]))\n"
            "import fleet.drivers\n"
            "driver = fleet.drivers.DAGDriver.bind(app)\n"
            "assert fleet._api._prepare_app(driver)[0] is not driver  # a driver is rewritten\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert json.loads(out.stdout) == ["http", False, []]


def test_replica_imports_user_deployments_without_pydantic(tmp_path) -> None:
    # a replica imports the user's module (its class is pickled by reference), which runs
    # @fleet.deployment again: there the options are kept unchecked until first use
    (tmp_path / "userapp.py").write_text(
        "import fleet\n\n"
        "@fleet.deployment(num_replicas=2, max_ongoing_requests=7)\n"
        "class Model:\n    pass\n\n"
        "bad = fleet.deployment(num_replicas=-1)(lambda: None)\n"
        "app = Model.options(name='Other').bind()\n")
    code = ("import json, sys\n"
            "from fleet._types import ProcessRole\n"
            "ProcessRole.replica = True\n"
            "import userapp\n"
            "loaded = 'pydantic' in sys.modules\n"
            "names = [userapp.Model.name, userapp.app.deployment.name]\n"
            "limit = userapp.app.deployment.config.max_ongoing_requests  # checked now\n"
            "try:\n    userapp.bad.config\nexcept ValueError as exc:\n    bad = str(exc)\n"
            "print(json.dumps([loaded, names, limit, bad]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=tmp_path)
    loaded, names, limit, bad = json.loads(out.stdout)
    assert (loaded, names, limit) == (False, ["Model", "Other"], 7)
    assert "num_replicas" in bad


def test_the_management_server_loads_no_http_client() -> None:
    # httpx imports its command line's click, rich and pygments (about 7 MiB) when they
    # are installed: the management server of every `fleet run` and `fleet start`
    # loads it only once the dashboard's playground relays a request
    code = ("import json, sys, fleet._api, fleet._cli, fleet._manage.server\n"
            "print(json.dumps([m for m in ('httpx', 'rich', 'pygments') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert json.loads(out.stdout) == []


def test_the_http_proxy_loads_the_websocket_library_at_the_first_upgrade_only() -> None:
    code = ("import sys, uvicorn\n"
            "from fleet._proxy.http import _WebSocketProtocol\n"
            "async def app(scope, receive, send): pass\n"
            "config = uvicorn.Config(app, ws=_WebSocketProtocol, lifespan='off')\n"
            "config.load()\n"
            "assert 'websockets' not in sys.modules\n"
            "from uvicorn.server import ServerState\n"
            "protocol = config.ws_protocol_class(config=config, server_state=ServerState(),\n"
            "                                    app_state={}, _loop=None)\n"
            "print(type(protocol).__name__, 'websockets' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["WebSocketsSansIOProtocol", "True"], out.stderr
