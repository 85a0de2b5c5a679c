"""The `fleet` command, run as a user would: a real subprocess, real HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import psutil
import pytest

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def fleet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleet", *args]


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path_factory, monkeypatch):
    """Each test's instance records itself in its own temp dir, so `fleet status`
    finds this test's instance and no other on the machine."""
    tmp = tmp_path_factory.mktemp("fleet-tmp")
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return tmp


def start(*args: str) -> tuple[subprocess.Popen[str], int]:
    """Start `fleet run ...` and wait for it to print where it serves."""
    proc = subprocess.Popen(fleet_cmd("run", *args, "--app-dir", HERE, "--port", "0",
                                      "--address", "127.0.0.1:0"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=HERE, start_new_session=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"fleet: HTTP on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    proc.wait(10)
    raise AssertionError("fleet run exited before serving:\n" + "".join(lines))


def stop(proc: subprocess.Popen[str]) -> None:
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left behind: {alive}"


def run_to_end(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fleet_cmd(*args), capture_output=True, text=True, cwd=HERE,
                          timeout=60)


def test_version_and_help():
    import shutil
    script = shutil.which("fleet")
    assert script is not None, "the fleet console script is not installed"
    out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "0.1.0" in out.stdout
    out = run_to_end("--help")
    assert out.returncode == 0 and "run" in out.stdout and "status" in out.stdout
    out = run_to_end("run", "--help")      # where a config file's import paths are found
    assert "(default: the current one, for a config file too)" in " ".join(out.stdout.split())


def test_run_serves_and_sigterm_leaves_no_process_behind():
    proc, port = start("apps.cli_apps:app")
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/")
        assert r.status_code == 200 and r.text == "hello from fleet"
        status = run_to_end("status")
        assert status.returncode == 0
        assert "state: RUNNING" in status.stdout and "Hello" in status.stdout
    finally:
        stop(proc)


def test_run_ctrl_c_stops_cleanly():
    # the target is a function returning the Application, called with no args
    proc, port = start("apps.cli_apps:build", "--route-prefix", "/hi", "--name", "greeter",
                       "--host", "127.0.0.1", "--grpc-port", "0")
    assert proc.stdout is not None
    grpc_line = proc.stdout.readline()      # printed right after the HTTP address
    m = re.search(r"fleet: gRPC on 127\.0\.0\.1:(\d+)", grpc_line)
    assert m and int(m.group(1)) > 0, grpc_line
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len([p for p in family if "fleet._proxy" in " ".join(p.cmdline())]) == 2
    assert httpx.get(f"http://127.0.0.1:{port}/hi").text == "hi from fleet"
    os.killpg(proc.pid, signal.SIGINT)     # what a terminal's Ctrl-C does
    assert proc.wait(60) == 0
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive


def test_a_stop_signal_is_seen_from_other_threads_before_its_handler_runs():
    # SIGTERM to fleet run's process group stops the replicas on their own while the
    # driver's handler waits for the main thread; the controller's thread reads the
    # signal from the wakeup pipe at once, so it replaces none of them
    script = textwrap.dedent("""
        import os, signal, threading
        from fleet import _signals
        from fleet._api import StopSignals
        stop = StopSignals()
        stop.serving()
        signal.signal(signal.SIGTERM, stop)
        seen = []
        main_blocks = threading.Event()
        def other_thread():
            main_blocks.wait(10)
            seen.append(_signals.stop_signalled())
            # the main thread blocks SIGTERM, so the kernel runs the C-level handler on
            # this thread before kill() returns; the Python handler waits for main
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append(_signals.stop_signalled())
            seen.append(_signals.stop_signalled())  # it stays seen
            seen.append(stop.event.is_set())
        t = threading.Thread(target=other_thread)
        t.start()
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
        main_blocks.set()
        t.join()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
        stop.event.wait(10)
        print(seen, stop.event.is_set())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[False, True, True, False] True"


@pytest.mark.parametrize("kind,flags", [("HTTP", ["--port"]),
                                        ("gRPC", ["--port", "0", "--grpc-port"])])
def test_a_port_another_process_holds_is_one_line_saying_what_to_do(kind, flags):
    # grpc's core logs lines of its own when its bind fails: the port is checked first
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_to_end("run", "apps.cli_apps:app", "--app-dir", HERE, *flags, str(port))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"fleet: error: the {kind} proxy cannot listen on 127.0.0.1:{port}: [Errno 98] "
        "Address already in use; stop what uses it or pick another port (0 picks a free "
        "one)"], out.stderr


def test_run_yaml_config_with_args_and_overrides(tmp_path):
    config = tmp_path / "fleet.yaml"
    config.write_text(textwrap.dedent("""
        http_options:
          host: 127.0.0.1
        applications:
          - name: greeter
            route_prefix: /greet
            import_path: apps.cli_apps:build
            args: {greeting: bonjour}
            deployments:
              - name: Hello
                num_replicas: 2
    """))
    proc, port = start(str(config))
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/greet").text == "bonjour from fleet"
        out = run_to_end("status", "--json")
        import json
        st = json.loads(out.stdout)["applications"]["greeter"]["deployments"]["Hello"]
        assert len(st["replicas"]) == 2
    finally:
        stop(proc)


@pytest.mark.parametrize("target,message", [
    ("nosuchmodule:app", "cannot import module 'nosuchmodule'"),
    ("apps.cli_apps:missing", "has no attribute 'missing'"),
    ("apps.cli_apps:not_an_app", "not a fleet Application (did you forget .bind()?)"),
    ("apps.cli_apps:number", "is a int, not a fleet Application"),
    ("no_colon", "bad import path"),
    ("apps.cli_apps:failing_build", "calling 'apps.cli_apps:failing_build' raised "
                                    "RuntimeError: no model configured"),
])
def test_bad_targets_print_one_line_and_exit_1(target, message):
    out = subprocess.run(fleet_cmd("run", target, "--app-dir", HERE, "--port", "0"),
                         capture_output=True, text=True, cwd=HERE, timeout=60)
    assert out.returncode == 1
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_constructor_failure_exits_1_with_the_error():
    started = time.monotonic()
    out = subprocess.run(fleet_cmd("run", "apps.cli_apps:broken", "--app-dir", HERE,
                                   "--port", "0"),
                         capture_output=True, text=True, cwd=HERE, timeout=60)
    assert out.returncode == 1
    assert "DEPLOY_FAILED" in out.stderr or "raised ValueError" in out.stderr
    assert "weights not found at /models/x.bin" in out.stderr
    assert time.monotonic() - started < 30


def test_bad_yaml_option_names_it(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("applications:\n  - import_path: apps.cli_apps:app\n    replicas: 3\n")
    out = run_to_end("run", str(config))
    assert out.returncode == 1
    assert "unknown option 'applications.0.replicas'" in out.stderr


def test_status_without_instance_says_so(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    out = subprocess.run(fleet_cmd("status"), capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 1
    assert "no fleet instance is running" in out.stderr


def test_yaml_traffic_split_is_applied(tmp_path):
    config = tmp_path / "traffic.yaml"
    config.write_text(textwrap.dedent("""
        applications:
          - name: v1
            route_prefix: /svc
            import_path: apps.cli_apps:build
            args: {greeting: one}
          - name: v2
            route_prefix: /svc-v2
            import_path: apps.cli_apps:build
            args: {greeting: two}
        traffic:
          - route_prefix: /svc
            weights: {v1: 0, v2: 1}
    """))
    proc, port = start(str(config))
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/svc").text == "two from fleet"
    finally:
        stop(proc)


def test_builders_are_called_with_the_args_as_a_dict_keywords_or_nothing():
    from apps import cli_apps

    from fleet._cli import CLIError, resolve_app

    def keywords(greeting: str = "hey"):
        return cli_apps.Hello.bind(greeting)

    assert resolve_app(cli_apps.make, "m:make").args == ("made",)
    assert resolve_app(cli_apps.build, "m:build").args == ("hi",)
    assert resolve_app(cli_apps.build, "m:build", {"greeting": "yo"}).args == ("yo",)
    assert resolve_app(keywords, "m:keywords", {"greeting": "yo"}).args == ("yo",)
    with pytest.raises(CLIError, match="cannot be called with the config's args"):
        resolve_app(cli_apps.make, "m:make", {"greeting": "yo"})
