"""The Ray backend on a real two-node Ray cluster on this machine (conftest's ray_cluster):
placement by resources, PENDING replicas, a proxy per node on one port, driver
deployments on every node, and the Ray-specific bad inputs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import psutil
import pytest
from conftest import RAY_NODE  # noqa: E402
from helpers import http_port, replicas, wait_for

import fleet
from fleet._config import FleetConfig

pytestmark = pytest.mark.ray


@fleet.deployment
class Where:
    def __call__(self, request: Any = None) -> int:
        return os.getpid()


@pytest.fixture(scope="module")
def cluster(ray_cluster: Any) -> Iterator[dict[str, Any]]:
    """A fleet instance on the cluster, and the cluster's node ids by custom resource."""
    import ray
    fleet.shutdown()
    fleet.start(backend="ray", ray_address=ray_cluster.address,
                http_options={"host": "127.0.0.1", "port": 0},
                grpc_options={"host": "127.0.0.1", "port": 0})
    nodes = {}
    for node in ray.nodes():
        if node["Alive"]:
            for name in ("head", "worker"):
                if name in node["Resources"]:
                    nodes[name] = node["NodeID"]
    try:
        yield {"address": ray_cluster.address, "nodes": nodes}
    finally:
        fleet.shutdown()


def test_replicas_are_placed_by_their_ray_actor_options_resources(cluster) -> None:
    for name in ("worker", "head"):
        app = Where.options(name=f"On{name}", num_replicas=2,
                            ray_actor_options={"num_cpus": 0.5, "resources": {name: 0.1}})
        handle = fleet.run(app.bind(), name=f"on-{name}", route_prefix=None)
        reps = replicas(f"on-{name}", f"On{name}")
        assert {r["node_id"] for r in reps} == {cluster["nodes"][name]}
        assert all(r["state"] == "RUNNING" for r in reps)
        assert handle.remote().result() in {r["pid"] for r in reps}
        fleet.delete(f"on-{name}")


def test_a_replica_no_node_can_hold_is_pending_naming_the_resources(cluster) -> None:
    # startup_timeout_s counts from placement: waiting for a node is not a hung start
    app = Where.options(name="Huge", ray_actor_options={"resources": {"tpu_pod": 1}},
                        startup_timeout_s=1)
    thread = threading.Thread(target=lambda: _run_quietly(app, "huge"), daemon=True)
    thread.start()
    try:
        wait_for(lambda: "huge" in fleet.status()["applications"]
                 and replicas("huge", "Huge") and replicas("huge", "Huge")[0]["uptime_s"] > 2)
        status = fleet.status()["applications"]["huge"]
        rep = status["deployments"]["Huge"]["replicas"][0]
        assert rep["state"] == "PENDING"
        assert "tpu_pod=1" in rep["message"] and "CPU=1" in rep["message"], rep["message"]
        assert "no live node has that much" in rep["message"]
        assert status["deployments"]["Huge"]["status"] == "UPDATING"
        assert status["status"] == "DEPLOYING"
    finally:
        fleet.delete("huge")
        thread.join(30)
    assert not thread.is_alive()


def test_max_replicas_per_node_spreads_replicas_and_holds_the_rest_pending(cluster) -> None:
    app = Where.options(name="Spread", num_replicas=3, max_replicas_per_node=1,
                        ray_actor_options={"num_cpus": 0.1})
    thread = threading.Thread(target=lambda: _run_quietly(app, "spread"), daemon=True)
    thread.start()
    try:
        def settled() -> list[dict[str, Any]] | None:
            reps = replicas("spread", "Spread") \
                if "spread" in fleet.status()["applications"] else []
            states = sorted(r["state"] for r in reps)
            return reps if states == ["PENDING", "RUNNING", "RUNNING"] else None
        reps = wait_for(settled, 60)
        running = [r for r in reps if r["state"] == "RUNNING"]
        assert {r["node_id"] for r in running} == set(cluster["nodes"].values())
        pending = next(r for r in reps if r["state"] == "PENDING")
        assert "max_replicas_per_node=1" in pending["message"]
    finally:
        fleet.delete("spread")
        thread.join(30)


def _run_quietly(app: Any, name: str) -> None:
    try:
        fleet.run(app.bind(), name=name, route_prefix=None)
    except fleet.FleetError:
        pass        # deleted while deploying, as the test does


def test_a_driver_deployment_runs_one_replica_on_every_node(cluster) -> None:
    app = Where.options(name="Everywhere", is_driver_deployment=True,
                        ray_actor_options={"num_cpus": 0.1})
    fleet.run(app.bind(), name="everywhere", route_prefix=None)
    reps = replicas("everywhere", "Everywhere")
    assert sorted(r["node_id"] for r in reps) == sorted(cluster["nodes"].values())
    fleet.delete("everywhere")


def test_every_node_has_a_proxy_and_they_share_one_port(cluster) -> None:
    fleet.run(Where.options(ray_actor_options={"num_cpus": 0.1}).bind(), name="web",
              route_prefix="/web")
    status = fleet.status()
    head = status["proxies"]["http"]
    by_node = status["proxies_by_node"]
    assert set(by_node) == set(cluster["nodes"].values())
    assert by_node[cluster["nodes"]["head"]]["http"]["pid"] == head["pid"]
    assert {p["http"]["port"] for p in by_node.values()} == {head["port"]}
    pids = {p["http"]["pid"] for p in by_node.values()}
    assert len(pids) == 2 and set(head["pids"]) == pids
    for pid in pids:            # each proxy listens on the port itself (SO_REUSEPORT)
        listening = [c for c in psutil.Process(pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == head["port"]]
        assert listening, pid
    for _ in range(20):         # a new connection each time: either proxy answers
        with httpx.Client() as client:
            reply = client.get(f"http://127.0.0.1:{head['port']}/web")
        assert reply.status_code == 200, reply.text
    fleet.delete("web")


def test_grpc_proxies_on_every_node_serve_a_driver_running_on_every_node(cluster) -> None:
    from test_grpc_predict import Doubler, Summer

    from fleet.dag import InputNode
    from fleet.drivers import DefaultgRPCDriver
    from fleet.generated import serve_pb2, serve_pb2_grpc
    graph = Summer.options(ray_actor_options={"num_cpus": 0.1}).bind(
        Doubler.options(ray_actor_options={"num_cpus": 0.1}).bind()).as_bytes.bind(InputNode())
    fleet.run(DefaultgRPCDriver.options(ray_actor_options={"num_cpus": 0.1}).bind(graph),
              name="predict", route_prefix="/predict")
    status = fleet.status()
    port = status["proxies"]["grpc"]["port"]
    assert {p["grpc"]["port"] for p in status["proxies_by_node"].values()} == {port}
    drivers = replicas("predict", "DefaultgRPCDriver")
    assert sorted(r["node_id"] for r in drivers) == sorted(cluster["nodes"].values())
    for _ in range(10):         # a new channel each time: either node's proxy answers
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = serve_pb2_grpc.PredictAPIsServiceStub(channel).Predict(
                serve_pb2.PredictRequest(input={"a": b"4", "b": b"1"}),
                metadata=(("application", "predict"),), timeout=10)
        assert reply.prediction == b"10"
    fleet.delete("predict")


def test_a_second_start_with_another_backend_or_cluster_raises(cluster) -> None:
    with pytest.raises(fleet.FleetError, match="backend='ray' already runs"):
        fleet.start(backend="local")
    with pytest.raises(fleet.FleetError, match="cannot move it"):
        fleet.start(backend="ray", ray_address="10.0.0.1:6379")
    fleet.start(backend="ray", ray_address=cluster["address"])     # the same: fine
    # this process's instance is its own (the driver's): detached=True cannot change it
    with pytest.raises(fleet.FleetError, match="detached=True cannot change it"):
        fleet.start(backend="ray", ray_address=cluster["address"], detached=True)


def test_another_process_reaches_the_instance_and_calls_replicas_on_the_cluster(
        cluster) -> None:
    import tempfile
    fleet.run(Where.options(name="Shared", ray_actor_options={"num_cpus": 0.1}).bind(),
              name="shared", route_prefix=None)
    pids = {r["pid"] for r in replicas("shared", "Shared")}
    out = _driver(f"""
        import fleet
        fleet.start(backend="ray", ray_address={cluster["address"]!r})   # attaches
        print("PID", fleet.get_app_handle("shared").remote().result())
        try:
            fleet.start(backend="local")
        except fleet.FleetError as exc:
            print("REFUSED", exc)
    """, TMPDIR=tempfile.gettempdir())       # where this process's instance is recorded
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert int(lines["PID"]) in pids, out.stdout + out.stderr
    assert "backend='ray' already runs (pid" in lines["REFUSED"]
    fleet.delete("shared")


def test_unknown_ray_actor_options_key_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        fleet.deployment(ray_actor_options={"num_cpu": 1})(Where.func_or_class)
    text = str(info.value)
    assert "unknown key(s) 'num_cpu'" in text and "did you mean 'num_cpus'" in text
    assert "valid keys are memory, num_cpus, num_gpus, resources, runtime_env" in text
    with pytest.raises(ValueError, match="num_gpus must be a number >= 0"):
        fleet.deployment(ray_actor_options={"num_gpus": -1})(Where.func_or_class)
    with pytest.raises(ValueError, match="max_replicas_per_node must be >= 1"):
        fleet.deployment(max_replicas_per_node=0)(Where.func_or_class)


def test_yaml_names_the_backend_its_cluster_and_where_proxies_go() -> None:
    config = FleetConfig(backend="ray", ray_address="auto", proxy_location="HeadOnly",
                         applications=[{"import_path": "x:y", "deployments": [
                             {"name": "A", "max_replicas_per_node": 2,
                              "ray_actor_options": {"num_cpus": 2}}]}])
    assert (config.backend, config.ray_address, config.proxy_location) == \
        ("ray", "auto", "HeadOnly")
    with pytest.raises(ValueError, match="backend"):
        FleetConfig(backend="kubernetes")
    with pytest.raises(ValueError, match="unknown key"):
        FleetConfig(applications=[{"import_path": "x:y", "deployments": [
            {"name": "A", "ray_actor_options": {"gpus": 1}}]}])


def _driver(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


def test_no_cluster_at_the_address_is_one_line_within_30_s() -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'fleet[ray]'")
    with _refusing_port() as port:
        started = time.monotonic()
        out = _driver(f"""
            import fleet
            try:
                fleet.start(backend="ray", ray_address="127.0.0.1:{port}")
            except fleet.FleetError as exc:
                print("ERROR", exc)
        """)
        assert time.monotonic() - started < 30
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("ERROR"))
    assert f"no Ray cluster answers at ray_address='127.0.0.1:{port}'" in line
    assert "ray start --head" in line


def test_ray_backend_without_ray_installed_says_how_to_install_it() -> None:
    out = _driver("""
        import sys
        sys.modules["ray"] = None       # as if Ray were not installed
        import fleet
        try:
            fleet.start(backend="ray")
        except fleet.FleetError as exc:
            print("ERROR", exc)
    """)
    assert "ERROR backend='ray' needs Ray, which is not installed here: " \
           "pip install 'fleet[ray]'" in out.stdout, out.stdout + out.stderr


HERE = os.path.dirname(__file__)


@contextlib.contextmanager
def _refusing_port() -> Iterator[int]:
    """A port nothing answers on: held bound but not listening while the test runs, so
    connections are refused and no other process can take it meanwhile."""
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


def test_fleet_run_of_a_yaml_config_with_backend_ray_serves_from_the_cluster(
        ray_cluster: Any, tmp_path: Any) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(textwrap.dedent(f"""
        backend: ray
        ray_address: {ray_cluster.address}
        proxy_location: HeadOnly
        http_options: {{host: 127.0.0.1, port: 0, num_proxies: 2}}
        applications:
          - import_path: apps.cli_apps:app
            deployments:
              - {{name: Hello, ray_actor_options: {{num_cpus: 0.1}}}}
          - name: env
            route_prefix: /env
            import_path: apps.cli_apps:env
            runtime_env: {{env_vars: {{FLEET_TEST_FROM: the application's runtime_env}}}}
            deployments:
              - {{name: Env, ray_actor_options: {{num_cpus: 0.1}}}}
    """))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "run", str(config), "--app-dir", HERE],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE,
        start_new_session=True)
    try:
        assert proc.stdout is not None
        port = http_port(proc.stdout)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
        # an application's runtime_env reaches its replicas (the job's working_dir too)
        assert httpx.get(f"http://127.0.0.1:{port}/env/FLEET_TEST_FROM",
                         timeout=10).text == "the application's runtime_env"
        out = subprocess.run([sys.executable, "-m", "fleet", "status", "--json"],
                             capture_output=True, text=True, timeout=60, cwd=HERE)
        status = json.loads(out.stdout)
        assert status["applications"]["default"]["status"] == "RUNNING"
        rep = status["applications"]["default"]["deployments"]["Hello"]["replicas"][0]
        assert len(rep["node_id"]) == 56            # a Ray node id, in hex
        assert len(status["proxies_by_node"]) == 1   # HeadOnly
        # num_proxies: two proxy actors on the node, both listening on the one port
        (head,) = status["proxies_by_node"].values()
        pids = head["http"]["pids"]
        assert len(set(pids)) == 2, head
        for pid in pids:
            assert any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                       for c in psutil.Process(pid).net_connections("tcp")), pid
        actors = [psutil.Process(rep["pid"]), *(psutil.Process(pid) for pid in pids)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    _, alive = psutil.wait_procs(actors, timeout=30)     # its actors ended with it
    assert not alive, alive


def test_fleet_start_on_the_cluster_then_apply_status_and_shutdown(ray_cluster: Any,
                                                                   tmp_path: Any) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True,
                              text=True, timeout=120, cwd=HERE)

    out = cli("start", "--backend", "ray", "--ray-address", ray_cluster.address,
              "--proxy-location", "HeadOnly", "--port", "0", "--address", "127.0.0.1:0")
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stderr.splitlines() if "started instance pid" in x)
    # the instance is the detached controller's actor: this command left nothing behind
    assert "detached actor fleet-controller" in line
    daemon = psutil.Process(int(line.split("pid ")[1].split(";")[0]))
    assert "ControllerActor" in " ".join(daemon.cmdline())
    # the management API's port, bound by the instance and read back (one chosen here
    # beforehand could be taken by another process in between)
    address = line.split("management API at http://")[1].split()[0]
    # the actor writes its instance file on its node (here, in the directory of the test
    # that started the cluster): the token comes from the dashboard line instead
    token = next(x for x in out.stderr.splitlines() if "dashboard:" in x).split("token=")[1]
    try:
        config = tmp_path / "fleet.yaml"
        config.write_text(textwrap.dedent("""
            applications:
              - import_path: apps.cli_apps:app
                deployments:
                  - {name: Hello, ray_actor_options: {num_cpus: 0.1}}
        """))
        out = cli("apply", str(config), "--app-dir", HERE, "--address", address,
                  "--token", token)
        assert out.returncode == 0, out.stderr
        out = cli("status", "-o", "json", "--address", address, "--token", token)
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        rep = status["applications"]["default"]["deployments"]["Hello"]["replicas"][0]
        assert len(rep["node_id"]) == 56            # a Ray node id, in hex: on the cluster
        assert len(status["proxies_by_node"]) == 1   # HeadOnly
        actor = psutil.Process(rep["pid"])
        # found through the cluster, by a process that has no instance file to read
        elsewhere = {k: v for k, v in os.environ.items()
                     if k not in ("FLEET_ADDRESS", "FLEET_TOKEN", "RAY_ADDRESS")}
        elsewhere["XDG_RUNTIME_DIR"] = str(tmp_path / "empty")
        os.mkdir(elsewhere["XDG_RUNTIME_DIR"], 0o700)
        found = subprocess.run([sys.executable, "-m", "fleet", "status", "-o", "json",
                                "--ray-address", ray_cluster.address], capture_output=True,
                               text=True, timeout=120, cwd=HERE, env=elsewhere)
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)["applications"]["default"]["status"] == "RUNNING"
        out = subprocess.run([sys.executable, "-m", "fleet", "shutdown"], capture_output=True,
                             text=True, timeout=120, cwd=HERE,
                             env=dict(elsewhere, RAY_ADDRESS=ray_cluster.address))
        assert out.returncode == 0, out.stderr
    finally:
        if daemon.is_running():
            daemon.terminate()
    _, alive = psutil.wait_procs([daemon, actor], timeout=60)
    assert not alive, alive
    gone = subprocess.run([sys.executable, "-m", "fleet", "status", "--ray-address",
                           ray_cluster.address], capture_output=True, text=True,
                          timeout=120, cwd=HERE, env=elsewhere)
    assert gone.returncode == 1
    assert gone.stderr.strip().splitlines() == [
        f"fleet: error: no fleet instance runs on the Ray cluster at ray_address="
        f"{ray_cluster.address!r}; start one with `fleet start --backend ray "
        f"--ray-address {ray_cluster.address}`"]


def test_fleet_start_ray_address_without_backend_ray_is_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "fleet", "start", "--ray-address", "auto"],
                         capture_output=True, text=True, timeout=60, cwd=HERE)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "fleet: error: --ray-address applies to --backend ray only"]


def test_fleet_run_ships_the_app_dir_to_nodes_whose_path_lacks_it(ray_cluster: Any,
                                                                   tmp_path: Any) -> None:
    app_dir = tmp_path / "shipped"
    app_dir.mkdir()
    (app_dir / "shipped_app.py").write_text(textwrap.dedent("""
        import os
        import sys

        import fleet


        @fleet.deployment(ray_actor_options={"num_cpus": 0.1})
        class Source:
            def __call__(self, request=None) -> dict:
                return {"file": __file__, "cwd": os.getcwd(), "path": sys.path}


        app = Source.bind()
    """))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "run", "shipped_app:app", "--app-dir", str(app_dir),
         "--port", "0", "--backend", "ray", "--ray-address", ray_cluster.address,
         "--proxy-location", "HeadOnly"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(app_dir),
        start_new_session=True)
    try:
        assert proc.stdout is not None
        port = http_port(proc.stdout)
        where = httpx.get(f"http://127.0.0.1:{port}/", timeout=10).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    # the replica imported the copy Ray shipped, from its working directory; the
    # application's own directory is nowhere on its path
    here = os.path.realpath(app_dir)
    assert os.path.basename(where["file"]) == "shipped_app.py"
    assert not os.path.realpath(where["file"]).startswith(here)
    assert os.path.realpath(where["cwd"]) == os.path.dirname(os.path.realpath(where["file"]))
    assert not any(os.path.realpath(p or ".") == here for p in where["path"])


def test_fleet_run_with_no_cluster_at_the_address_is_one_line() -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'fleet[ray]'")
    with _refusing_port() as port:
        out = subprocess.run(
            [sys.executable, "-m", "fleet", "run", "apps.cli_apps:app", "--app-dir", HERE,
             "--port", "0", "--backend", "ray", "--ray-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, cwd=HERE)
    assert out.returncode == 1
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("fleet: error")]
    assert errors == [f"fleet: error: no Ray cluster answers at ray_address="
                      f"'127.0.0.1:{port}' ([Errno 111] Connection refused); start one with "
                      "`ray start --head` and pass its address (host:port), or 'auto' for "
                      "the cluster this machine belongs to"], out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "fleet", "run", "apps.cli_apps:app", "--app-dir", HERE,
         "--ray-address", "auto"], capture_output=True, text=True, timeout=60, cwd=HERE)
    assert out.returncode == 1
    assert "--ray-address (ray_address) applies to --backend ray" in out.stderr


def test_the_readme_example_runs_on_the_cluster_named_by_ray_address(ray_cluster) -> None:
    root = os.path.dirname(HERE)
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "ray_cluster.py")],
                         capture_output=True, text=True, timeout=120, cwd=root,
                         env={**os.environ, "RAY_ADDRESS": ray_cluster.address})
    assert out.returncode == 0, out.stderr
    assert "2 replicas on 2 nodes, proxies on 2; a call answered from node" in out.stdout


def test_a_killed_proxy_actor_on_a_live_node_is_started_again_on_its_port(cluster) -> None:
    fleet.run(Where.options(ray_actor_options={"num_cpus": 0.1}).bind(), name="again",
              route_prefix="/again")
    try:
        worker = cluster["nodes"]["worker"]
        before = fleet.status()["proxies_by_node"][worker]["http"]
        os.kill(before["pid"], signal.SIGKILL)      # the proxy actor's worker process

        def replaced() -> dict[str, Any] | None:
            info = fleet.status()["proxies_by_node"].get(worker, {}).get("http")
            return info if info and info["pid"] != before["pid"] else None
        after = wait_for(replaced, 60, "the worker node's HTTP proxy in proxies_by_node again")
        assert after["port"] == before["port"]
        assert set(fleet.status()["proxies_by_node"]) == set(cluster["nodes"].values())
        listening = [c for c in psutil.Process(after["pid"]).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == before["port"]]
        assert listening
        for _ in range(10):         # a new connection each time: either node's proxy answers
            with httpx.Client(timeout=20) as client:
                reply = client.get(f"http://127.0.0.1:{before['port']}/again")
            assert reply.status_code == 200, reply.text
    finally:
        fleet.delete("again")


def test_num_proxies_on_a_cluster_counts_per_node_and_auto_is_the_nodes_cpus() -> None:
    import types

    from fleet._api import _proxies_on
    node = {"node_id": "n", "cpus": 6.0}
    assert _proxies_on(types.SimpleNamespace(num_proxies=2), node) == 2
    assert _proxies_on(types.SimpleNamespace(num_proxies="auto"), node) == 6
    assert _proxies_on(types.SimpleNamespace(num_proxies="auto"), {"cpus": 0}) == 1


def test_a_replica_lost_with_its_node_before_it_started_is_placed_again() -> None:
    """Pinned (max_replicas_per_node) to a node Ray still listed but that was leaving,
    a replica's actor fails to schedule or dies of the node: nothing of the user's ran, so
    the backend places it again instead of reporting a replica that failed to start. An
    error of its own (in the actor's creation) still ends it."""
    import concurrent.futures

    from ray import exceptions

    from fleet._backends.ray import MAX_REPLACEMENTS, RayProcess

    def lost(exc: BaseException, node: str = "n1", replaced: int = 0) -> RayProcess:
        proc = RayProcess("r-1", "app#Dep", {"CPU": 1.0}, 2, spec=object(),  # type: ignore[arg-type]
                          options={})
        proc.actor, proc.node, proc.replaced = object(), node, replaced
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        fut.set_exception(exc)
        proc._on_exit(fut)
        return proc

    unschedulable = exceptions.ActorUnschedulableError("the node is gone")
    proc = lost(unschedulable)
    assert proc.alive() and proc.actor is None and proc.replaced == 1
    assert "its node left the cluster" in (proc.pending() or "")
    died = exceptions.RayActorError(actor_init_failed=False)
    assert lost(died).alive()
    assert not lost(died, node="").alive()               # not pinned: Ray's own business
    failed = lost(exceptions.RayActorError(actor_init_failed=True))
    assert not failed.alive() and failed.exit_code() == -9
    assert not lost(unschedulable, replaced=MAX_REPLACEMENTS).alive()   # bounded


@fleet.deployment(num_replicas=3, max_replicas_per_node=2, ray_actor_options={"num_cpus": 0.1})
class Sleeper:
    async def hang(self) -> None:
        await asyncio.sleep(60)

    def node(self) -> str:
        import ray
        return str(ray.get_runtime_context().get_node_id())


# its waits (a raylet starting, a proxy on it, replicas moving off a dead node) add up
# past the suite's 120 s per test on a loaded machine
@pytest.mark.timeout(360)
def test_a_node_that_joins_gets_a_proxy_and_one_that_dies_fails_its_calls_and_its_replicas_move(
        cluster, ray_cluster) -> None:
    """Last in this module: it adds a node and removes it."""
    spare = ray_cluster.add_node(**RAY_NODE, resources={"spare": 1})
    try:
        # A node's raylet takes seconds to start on a loaded 2-core machine.
        spare_id = wait_for(lambda: next((n["NodeID"] for n in __import__("ray").nodes()
                                          if n["Alive"] and "spare" in n["Resources"]), None),
                            60, "the spare node registers with Ray")
        # a node that joins gets its proxy (EveryNode)
        wait_for(lambda: spare_id in fleet.status()["proxies_by_node"], 60,
                 "a proxy on the spare node")
        handle = fleet.run(Sleeper.bind(), name="nodes", route_prefix=None)
        reps = replicas("nodes", "Sleeper")
        assert sorted(r["node_id"] for r in reps) == sorted([*cluster["nodes"].values(),
                                                            spare_id])
        doomed = next(r for r in reps if r["node_id"] == spare_id)
        hanging = [handle.hang.remote() for _ in range(9)]
        routers = fleet._runtime.current().routers
        router = wait_for(lambda: routers.get("nodes#Sleeper"), what="the handle's router")
        wait_for(lambda: sum(s.inflight for s in router.slots) == 9, 30,
                 "nine calls in flight")
        on_doomed = next(s.inflight for s in router.slots if s.replica_id == doomed["replica_id"])
        assert on_doomed >= 1
        ray_cluster.remove_node(spare)
        spare = None
        # the calls the dead node held fail (no hang); the others still run
        wait_for(lambda: sum(r._cfut.done() for r in hanging) == on_doomed, 20,
                 f"the {on_doomed} calls on the dead node fail")
        for resp in hanging:
            if resp._cfut.done():
                with pytest.raises(fleet.ReplicaDiedError, match=doomed["replica_id"]):
                    resp.result()
        # from the moment its calls failed, no call goes to the dead node
        assert all(handle.node.remote().result(timeout_s=10) != spare_id for _ in range(10))

        def moved() -> bool:
            now = replicas("nodes", "Sleeper")
            return len([r for r in now if r["state"] == "RUNNING"]) == 3 \
                and spare_id not in {r["node_id"] for r in now}
        wait_for(moved, 90, "three replicas running, none on the dead node")
        assert set(fleet.status()["proxies_by_node"]) == set(cluster["nodes"].values())
        for resp in hanging:
            resp.cancel()
    finally:
        if spare is not None:
            ray_cluster.remove_node(spare)
        fleet.delete("nodes")
