"""Another process on the machine reaches a running instance instead of starting its
own: status, handles, run and delete there; it never stops what it did not start,
unless it says fleet.shutdown()."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import httpx
import psutil
import pytest
from helpers import http_port

HERE = os.path.dirname(__file__)


@pytest.fixture
def env(tmp_path):
    """The private runtime location every process of one test shares, and no other."""
    e = dict(os.environ, TMPDIR=str(tmp_path))
    e.pop("XDG_RUNTIME_DIR", None)
    return e


@pytest.fixture
def served(env):
    proc = subprocess.Popen([sys.executable, "-m", "fleet", "run", "apps.cli_apps:app",
                             "--app-dir", HERE, "--port", "0"], cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stderr is not None
    port = http_port(proc.stderr)
    family = psutil.Process(proc.pid).children(recursive=True)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive


def script(env, tmp_path, body: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "second.py"
    path.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\nimport fleet\n"
                    + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(path)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=str(tmp_path))


def test_a_second_process_uses_the_running_instance(served, env, tmp_path):
    proc, port = served
    out = script(env, tmp_path, """
        from apps.cli_apps import Hello
        apps = fleet.status()["applications"]
        print("apps", sorted(apps))
        print("handle", fleet.get_app_handle("default").remote(None).result())
        fleet.run(Hello.bind("second"), name="second", route_prefix="/second")
        print("deployed")
    """)
    assert out.returncode == 0, out.stderr
    assert "apps ['default']" in out.stdout
    assert "handle hello from fleet" in out.stdout
    assert "deployed" in out.stdout
    # it deployed into the running instance, which outlives the script
    assert httpx.get(f"http://127.0.0.1:{port}/second").text == "second from fleet"
    assert proc.poll() is None
    status = subprocess.run([sys.executable, "-m", "fleet", "status", "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert '"second"' in status.stdout and '"default"' in status.stdout
    out = script(env, tmp_path, """
        fleet.delete("second")
        print(sorted(fleet.status()["applications"]))
    """)
    assert out.stdout.strip() == "['default']", out.stderr
    assert httpx.get(f"http://127.0.0.1:{port}/").text == "hello from fleet"


def test_start_with_other_options_names_the_difference(served, env, tmp_path):
    _proc, port = served
    other = port + 1 if port < 65535 else port - 1
    out = script(env, tmp_path, f"""
        fleet.start(http_options={{"port": {port}}})      # the same: fine
        try:
            fleet.start(http_options={{"port": {other}}})
        except fleet.FleetError as exc:
            print("refused:", exc)
    """)
    assert out.returncode == 0, out.stderr
    assert f"http_options.port={port} (asked for {other})" in out.stdout


def test_shutdown_from_another_process_stops_the_instance(served, env, tmp_path):
    proc, port = served
    family = psutil.Process(proc.pid).children(recursive=True)
    out = script(env, tmp_path, """
        fleet.status()
        fleet.shutdown()
        print("stopped")
    """)
    assert out.returncode == 0 and out.stdout.strip() == "stopped", out.stderr
    assert proc.wait(60) == 0
    # the proxy is gone too (its exit is its own, a moment after fleet run's): only then
    # is the port surely closed
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left behind: {alive}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/")


def test_status_with_nothing_running_says_so_and_starts_nothing(env, tmp_path):
    out = script(env, tmp_path, """
        try:
            fleet.status()
        except fleet.FleetError as exc:
            print("error:", exc)
        import fleet._api
        print("instance:", fleet._api._instance)
    """)
    assert out.returncode == 0, out.stderr
    assert "error: no fleet instance is running on this machine" in out.stdout
    assert "instance: None" in out.stdout
