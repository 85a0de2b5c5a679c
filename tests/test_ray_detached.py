"""The detached controller on a real two-node Ray cluster (conftest's ray_cluster): it
outlives the process that made it, other processes reach it, and when it is killed Ray
starts it again, it recovers its applications from its checkpoint and adopts the
replicas and proxies that still run, with traffic flowing and no request failing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import httpx
import pytest
from helpers import wait_for

import fleet

pytestmark = pytest.mark.ray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@fleet.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
class Pid:
    def __call__(self, request: Any = None) -> int:
        return os.getpid()


def _controller() -> Any:
    import ray
    return ray.get_actor("fleet-controller", namespace="fleet")


def _controller_pid() -> int | None:
    import ray
    try:
        return int(ray.get(_controller().info.remote(), timeout=10)["pid"])
    except Exception:  # noqa: BLE001 - restarting
        return None


def _replica_pids(app: str = "default") -> set[int]:
    deps = fleet.status()["applications"][app]["deployments"]
    return {r["pid"] for d in deps.values() for r in d["replicas"] if r["state"] == "RUNNING"}


def _nothing_left() -> None:
    """Shut the detached controller down; whatever a failed test left of it is killed."""
    import ray
    from ray.experimental import internal_kv
    fleet.shutdown()
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "fleet" and entry["name"].startswith("fleet-"):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace="fleet"), no_restart=True)
            except ValueError:
                pass
    internal_kv._internal_kv_del("controller-state", namespace="fleet")


@pytest.fixture
def detached(ray_cluster: Any) -> Any:
    fleet.shutdown()
    fleet.start(backend="ray", ray_address=ray_cluster.address, detached=True,
                http_options={"host": "127.0.0.1", "port": 0},
                management_options={"host": "127.0.0.1", "port": 0})
    try:
        yield ray_cluster
    finally:
        _nothing_left()


def test_a_killed_controller_restarts_recovers_and_adopts_with_traffic_flowing(
        detached: Any) -> None:
    import ray
    fleet.run(Pid.bind())
    port = fleet.status()["proxies"]["http"]["port"]
    pids = _replica_pids()
    assert len(pids) == 2
    before = _controller_pid()
    proxy_pids = fleet.status()["proxies"]["http"]["pids"]
    found = ray.get(_controller().info.remote(), timeout=30)
    stop = threading.Event()
    results = {"ok": 0, "failed": []}

    def load() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.get(f"http://127.0.0.1:{port}/")
                    if r.status_code == 200:
                        results["ok"] += 1
                    else:
                        results["failed"].append(r.status_code)
                except httpx.HTTPError as exc:
                    results["failed"].append(repr(exc))
    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_for(lambda: results["ok"] > 20, 30, "traffic before the kill")
        ray.kill(_controller(), no_restart=False)
        wait_for(lambda: _controller_pid() not in (None, before), 90,
                 "the controller to restart")
        served = results["ok"]
        wait_for(lambda: fleet.status()["applications"]["default"]["status"] == "RUNNING"
                 and _replica_pids() == pids, 60, "the application recovered")
        wait_for(lambda: results["ok"] > served + 20, 30, "traffic after the restart")
    finally:
        stop.set()
        thread.join(30)
    assert results["failed"] == []
    assert _replica_pids() == pids                     # adopted, not started again
    assert fleet.status()["proxies"]["http"]["pids"] == proxy_pids
    # the management API answers where it did, with the same token
    again = ray.get(_controller().info.remote(), timeout=30)
    assert (again["management"]["url"], again["token"]) == \
        (found["management"]["url"], found["token"])
    # the restarted controller deploys as before, and the adopted proxy routes there
    fleet.run(Pid.options(num_replicas=1).bind())
    wait_for(lambda: len(_replica_pids()) == 1, 60, "the scaled-down deployment")
    (only,) = _replica_pids()
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).json() == only


def _kv_state() -> bytes | None:
    from ray.experimental import internal_kv
    return internal_kv._internal_kv_get("controller-state", namespace="fleet")


def test_the_controller_outlives_its_driver_and_other_processes_reach_it(
        ray_cluster: Any) -> None:
    """The README's example: its script deploys and exits, the application stays."""
    import ray
    fleet.shutdown()
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address)
    try:
        done = subprocess.run([sys.executable, os.path.join(ROOT, "examples",
                                                            "ray_detached.py")],
                              capture_output=True, text=True, timeout=180, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "this script exits, the application stays" in done.stdout
        assert _kv_state()                               # its checkpoint, in the GCS
        # the driver exited; this process reaches the same instance on the cluster
        fleet.start(backend="ray", ray_address=ray_cluster.address)
        status = fleet.status()
        assert status["applications"]["kept"]["status"] == "RUNNING"
        port = status["proxies"]["http"]["port"]
        assert httpx.get(f"http://127.0.0.1:{port}/kept", timeout=10).text == "still serving"
        assert fleet.get_app_handle("kept").remote().result(timeout_s=30) == "still serving"
        # and so does the CLI, through the cluster
        out = subprocess.run([sys.executable, "-m", "fleet", "status", "--ray-address",
                              ray_cluster.address, "-o", "json"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert '"kept"' in out.stdout
        # fleet top and fleet metrics too, through the management API it published
        for args, expect in ((["top", "--once"], "kept"),
                             (["metrics"], 'application="kept"')):
            out = subprocess.run([sys.executable, "-m", "fleet", *args, "--ray-address",
                                  ray_cluster.address], capture_output=True, text=True,
                                 timeout=120, env=env)
            assert out.returncode == 0, out.stderr[-2000:]
            assert expect in out.stdout, (args, out.stdout[-2000:])
        fleet.shutdown()
        # shut down: the actor and its checkpoint are gone
        with pytest.raises(ValueError):
            ray.get_actor("fleet-controller", namespace="fleet")
        assert not _kv_state()
    finally:
        _nothing_left()


def test_a_replica_that_died_while_the_controller_was_down_is_replaced(
        detached: Any) -> None:
    import ray
    fleet.run(Pid.bind())
    port = fleet.status()["proxies"]["http"]["port"]
    deps = fleet.status()["applications"]["default"]["deployments"]
    victim = deps["Pid"]["replicas"][0]
    before = _controller_pid()
    ray.kill(_controller(), no_restart=False)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].endswith("-" + victim["replica_id"])]
    assert len(names) == 1
    ray.kill(ray.get_actor(names[0], namespace="fleet"), no_restart=True)
    wait_for(lambda: _controller_pid() not in (None, before), 90, "the controller to restart")
    wait_for(lambda: len(_replica_pids()) == 2 and victim["pid"] not in _replica_pids()
             and fleet.status()["applications"]["default"]["status"] == "RUNNING",
             90, "a replacement for the replica that died")
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200


def test_detached_needs_the_ray_backend() -> None:
    with pytest.raises(ValueError, match="backend='ray'"):
        fleet.start(detached=True)


def test_detached_without_a_cluster_is_one_line() -> None:
    # ray.init would start a private Ray that ends with the script: not what detached means
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    script = ("import fleet\n"
              "try:\n"
              "    fleet.start(backend='ray', detached=True)\n"
              "except fleet.FleetError as exc:\n"
              "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("a detached controller needs a running Ray cluster")
    cli = subprocess.run([sys.executable, "-m", "fleet", "start", "--backend", "ray"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert cli.returncode == 1
    assert cli.stderr.strip().splitlines() == [
        "fleet: error: a detached controller needs a running Ray cluster: start one (`ray "
        "start --head`) and pass its address as ray_address (or --ray-address), or set "
        "RAY_ADDRESS"]


def test_options_other_than_the_running_detached_instance_s_raise(detached: Any) -> None:
    port = fleet.status()["proxies"]["http"]["port"]
    other = port + 1 if port < 65535 else port - 1
    with pytest.raises(fleet.FleetError, match="already runs on the Ray cluster .* with "
                                               "other options: http_options.port"):
        fleet.start(backend="ray", ray_address=detached.address,
                    http_options={"host": "127.0.0.1", "port": other})
    # the same options (or none) use it as it is
    fleet.start(backend="ray", ray_address=detached.address)


def test_a_driver_owned_instance_on_the_cluster_keeps_fleet_start_from_making_one(
        ray_cluster: Any) -> None:
    import ray

    from fleet._backends.ray_actors import InstanceDirectory
    fleet.shutdown()
    book: Any = InstanceDirectory.options(name="fleet-controller", namespace="fleet",
                                          num_cpus=0).remote({"pid": 4242})
    try:
        ray.get(book.info.remote(), timeout=30)
        out = subprocess.run([sys.executable, "-m", "fleet", "start", "--backend", "ray",
                              "--ray-address", ray_cluster.address, "--port", "0",
                              "--address", "127.0.0.1:0"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1
        assert out.stderr.strip().splitlines() == [
            "fleet: error: a fleet instance owned by a driver (pid 4242) runs on this Ray "
            "cluster and holds the name 'fleet-controller'; stop it first (fleet.shutdown() "
            "in that process, or `fleet shutdown --ray-address ...`)"]
    finally:
        ray.kill(book)
        _nothing_left()


def test_a_controller_that_cannot_start_says_why_and_leaves_nothing(ray_cluster: Any) -> None:
    import socket

    import ray
    fleet.shutdown()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        out = subprocess.run([sys.executable, "-m", "fleet", "start", "--backend", "ray",
                              "--ray-address", ray_cluster.address, "--port", "0",
                              "--address", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("fleet: error: the fleet controller could not start on "
                                   "the Ray cluster: ")
        assert f"127.0.0.1:{port}" in lines[0]
        # the actor removed itself, with whatever it had started
        wait_for(lambda: not [a for a in ray.util.list_named_actors(all_namespaces=True)
                              if a["name"].startswith("fleet-")], 60,
                 "the failed controller's actors to end")
        assert not _kv_state()
    finally:
        taken.close()
        _nothing_left()
