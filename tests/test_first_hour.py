"""What a newcomer meets first: one-line errors in a user's words, hints for near misses,
progress while starting, and the failure of a deployment told once. The CLI runs as a
subprocess and its exact stderr lines are checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
from helpers import http_port, stop_family

import fleet
from fleet import _deployment

HERE = os.path.dirname(__file__)


def fleet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleet", *args]


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path_factory, monkeypatch):
    tmp = tmp_path_factory.mktemp("fleet-tmp")
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp


def run_to_end(*args: str, cwd: str = HERE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fleet_cmd(*args), capture_output=True, text=True, cwd=cwd,
                          timeout=90)


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


# -- option errors in a user's words ------------------------------------------------

@pytest.mark.parametrize("options,message", [
    ({"num_replicas": -1}, 'deployment \'A\': num_replicas must be a whole number >= 0 or '
                           '"auto", got -1'),
    ({"num_replicas": "two"}, 'deployment \'A\': num_replicas must be a whole number >= 0 '
                              'or "auto", got \'two\''),
    ({"num_replicas": True}, 'deployment \'A\': num_replicas must be a whole number >= 0 '
                             'or "auto", got True'),
    ({"max_ongoing_requests": 0}, "deployment 'A': max_ongoing_requests must be >= 1, got 0"),
    ({"health_check_period_s": "soon"},
     "deployment 'A': health_check_period_s must be a number, got 'soon'"),
    ({"autoscaling_config": {"min_replica": 1}},
     "deployment 'A': unknown option 'autoscaling_config.min_replica' (did you mean "
     "'min_replicas'?)"),
])
def test_python_option_errors_are_one_sentence(options, message):
    @fleet.deployment
    class A:
        pass

    with pytest.raises(ValueError) as info:
        A.options(**options)
    assert str(info.value) == message


def test_unknown_python_option_suggests_the_nearest():
    with pytest.raises(TypeError, match=r"num_replica \(did you mean 'num_replicas'\?\)"):
        fleet.deployment(num_replica=2)(lambda: None)


def test_yaml_errors_name_file_line_and_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(textwrap.dedent("""\
        http_options:
          prot: 8000
        applications:
          - import_path: apps.cli_apps:app
            route_prefix: /x
          - import_path: apps.cli_apps:app
            name: second
            args: [1, 2]
    """))
    line = one_error_line(run_to_end("run", str(config), "--app-dir", HERE))
    assert line == (
        f"fleet: error: config {str(config)!r}, line 2: unknown option 'http_options.prot' "
        f"(did you mean 'port'?); config {str(config)!r}, line 8: "
        "applications.1.args must be a mapping of options, got [1, 2]")


def test_invalid_yaml_names_line_and_column(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("applications:\n  - import_path: [a\n")
    line = one_error_line(run_to_end("run", str(config)))
    assert line.startswith(f"fleet: error: config {str(config)!r}, line 3, column 1: "
                           "not valid YAML: ")


def test_override_of_a_deployment_that_does_not_exist_names_the_real_ones(tmp_path):
    config = tmp_path / "helo.yaml"
    config.write_text(textwrap.dedent("""\
        applications:
          - import_path: apps.cli_apps:app
            deployments:
              - name: Helo
                num_replicas: 2
    """))
    line = one_error_line(run_to_end("run", str(config), "--app-dir", HERE, "--port", "0"))
    assert line == ("fleet: error: the config overrides deployment(s) 'Helo', which the "
                    "application does not have; its deployments are 'Hello'")


@pytest.mark.parametrize("args,message", [
    (("apps.cli_apps:app", "--port", "99999"),
     "fleet: error: --port must be a port number from 0 to 65535 (0 picks a free one), "
     "got 99999"),
    (("apps.cli_apps:app", "--port", "0", "--route-prefix", "greet"),
     "fleet: error: application 'default': route_prefix must start with '/' (or be None for "
     "no HTTP route), got 'greet'"),
    (("apps/files/single", "--port", "0"),
     "fleet: error: bad import path 'apps/files/single': did you mean apps/files/single.py?"),
    (("apps.cli_apps:ap", "--port", "0"),
     "fleet: error: module 'apps.cli_apps' has no attribute 'ap'; did you mean "
     "apps.cli_apps:app?"),
    (("apps/files/several.py:firs", "--port", "0"),      # the hint keeps the file's path
     "fleet: error: 'apps/files/several.py' has no attribute 'firs'; did you mean "
     "apps/files/several.py:first?"),
    (("apps/files/several.py", "--port", "0"),
     "fleet: error: 'apps/files/several.py' defines 2 applications (first, second); pick "
     "one, e.g. apps/files/several.py:first"),
    (("apps/files/nothing_here.py", "--port", "0"),
     "fleet: error: no such file 'apps/files/nothing_here.py'"),
])
def test_cli_mistakes_are_one_line(args, message):
    assert one_error_line(run_to_end("run", *args, "--app-dir", HERE)) == message


def test_a_module_named_as_an_attribute_gets_the_applications_it_defines():
    line = one_error_line(run_to_end("run", "apps.cli_apps", "--app-dir", HERE, "--port", "0"))
    assert line.startswith("fleet: error: module 'apps' has no attribute 'cli_apps'; did you "
                           "mean apps.cli_apps:app or apps.cli_apps:broken or ")
    assert "apps.cli_apps:gated" in line and line.endswith("?")


def start_serving(*args: str, env: dict[str, str] | None = None
                  ) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(fleet_cmd("run", *args, "--port", "0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE,
                            start_new_session=True, env=env)
    assert proc.stderr is not None
    return proc, http_port(proc.stderr)


@pytest.mark.parametrize("target", ["apps/files/single.py", "apps/files/single.py:app"])
def test_run_a_file_serves_its_only_application(target):
    proc, port = start_serving(target)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "single file"
    finally:
        stop_family(proc)


# -- progress --------------------------------------------------------------------

def test_run_prints_progress_and_status_shows_the_starting_constructor(tmp_path):
    gate = tmp_path / "gate"
    env = dict(os.environ, FLEET_TEST_GATE=str(gate))
    proc = subprocess.Popen(fleet_cmd("run", "apps.cli_apps:gated", "--port", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=HERE, start_new_session=True, env=env)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        first = proc.stderr.readline().rstrip("\n")
        assert first == "fleet: deploying application 'default': Gated x1"
        deadline = time.monotonic() + 30
        replica = None
        while time.monotonic() < deadline:
            out = subprocess.run(fleet_cmd("status", "--json"), capture_output=True, text=True,
                                 env=env, timeout=60)
            if out.returncode == 0:
                import json
                app = json.loads(out.stdout)["applications"].get("default")
                replicas = app["deployments"]["Gated"]["replicas"] if app else []
                if replicas and replicas[0]["message"] == "constructor running":
                    replica = replicas[0]
                    break
        assert replica is not None, "status never said the constructor is running"
        assert replica["state"] == "STARTING" and replica["uptime_s"] >= 0
        gate.write_text("open")
        rest = []
        for line in proc.stderr:
            rest.append(line.rstrip("\n"))
            if "press Ctrl-C" in line:
                break
        assert "fleet: Gated 1/1 ready" in rest
        port = int(re.search(r"fleet: HTTP on http://127\.0\.0\.1:(\d+)", "\n".join(rest))
                   .group(1))
        assert f"fleet: application 'default' RUNNING at http://127.0.0.1:{port}/ (Gated x1)" \
            in rest
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "opened"
    finally:
        stop_family(proc)
    assert proc.stdout.read() == "", "progress and addresses go to stderr, not stdout"


def test_blocking_run_says_where_it_serves(tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {HERE!r})
        import fleet
        from apps.cli_apps import app
        fleet.start(http_options={{"port": 0}})
        fleet.run(app, blocking=True)
        print("returned", flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if "RUNNING at" in line:
                break
        assert lines[0] == "fleet: deploying application 'default': Hello x1"
        assert "fleet: Hello 1/1 ready" in lines
        port = int(re.search(r"RUNNING at http://127\.0\.0\.1:(\d+)/", lines[-1]).group(1))
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "hello from fleet"
    finally:
        stop_family(proc)
    assert proc.stdout is not None and proc.stdout.read() == "returned\n"


# -- a failure told once -----------------------------------------------------------

def test_constructor_failure_prints_its_traceback_once_with_the_count(tmp_path, monkeypatch):
    # both replicas raise together (see BrokenTwice): the count does not depend on the
    # second one starting within fleet's moment of waiting for it
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    monkeypatch.setenv("FLEET_TEST_BARRIER", str(barrier))
    out = run_to_end("run", "apps.cli_apps:broken_twice", "--app-dir", HERE, "--port", "0")
    assert out.returncode == 1
    err = out.stderr
    assert err.count("Traceback (most recent call last)") == 1, err
    assert err.count("\nValueError: weights not found at /models/y.bin") == 1, err
    errors = [ln for ln in err.splitlines() if ln.startswith("fleet: error:")]
    assert errors == [
        "fleet: error: application 'default': the constructor of deployment 'BrokenTwice' "
        "(application 'default') raised ValueError: weights not found at /models/y.bin "
        "(2 replicas failed the same way)"]


def test_a_script_that_catches_the_failure_gets_nothing_on_stderr(tmp_path):
    script = tmp_path / "catch.py"
    script.write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {HERE!r})
        import fleet
        from apps.cli_apps import broken_twice
        fleet.start(http_options={{"port": 0}})
        try:
            fleet.run(broken_twice)
        except fleet.DeploymentFailedError as exc:
            print("caught", exc.error_type, flush=True)
        fleet.shutdown()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=90)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "caught ValueError\n"
    assert "Traceback" not in out.stderr and "weights not found" not in out.stderr, out.stderr


# -- no flake ----------------------------------------------------------------------

def test_source_hashing_runs_one_thread_at_a_time(monkeypatch):
    """inspect.getsource parses with ast, which CPython 3.11 can break when threads do it
    at once (gh-106905); fleet.run from several threads must not."""
    active = 0
    most = 0
    guard = threading.Lock()

    def fake_getsource(target):
        nonlocal active, most
        with guard:
            active += 1
            most = max(most, active)
        time.sleep(0.002)
        with guard:
            active -= 1
        return "source"

    monkeypatch.setattr(_deployment.inspect, "getsource", fake_getsource)
    threads = [threading.Thread(target=lambda: [_deployment._source_hash(object)
                                                for _ in range(20)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most == 1
