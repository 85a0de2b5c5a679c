"""Operating an instance with the `fleet` command, as a user would: `fleet start` in the
background, then apply, status, history, rollback, config and shutdown, each a real
subprocess talking to the management API over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import httpx
import psutil
import pytest
import yaml

HERE = os.path.dirname(__file__)


def fleet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleet", *args]


def run(*args: str, env: dict | None = None, cwd: str = HERE,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fleet_cmd(*args), capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleet: error: "), out.stderr
    return lines[0]


def _management_address(line: str) -> str:
    """HOST:PORT of the management API that `fleet start` names: asked for on port 0,
    the port the server bound is read back (one chosen beforehand could be taken by
    another process before the instance binds it)."""
    return line.split("management API at http://")[1].split()[0]


@pytest.fixture
def started(tmp_path):
    """`fleet start` on free ports; yields (pid, http url, management address); every
    process it started is gone afterwards."""
    out = run("start", "--port", "0", "--address", "127.0.0.1:0")
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stderr.splitlines() if "started instance pid" in x)
    pid = int(line.split("pid ")[1].split(";")[0])
    http = line.split("HTTP on ")[1].split(";")[0]
    address = _management_address(line)
    assert any(x.startswith(f"fleet: dashboard: http://{address}/?token=")
               for x in out.stderr.splitlines())
    proc = psutil.Process(pid)
    assert proc.ppid() != os.getpid()          # its own, not a child of the command
    family = [proc, *proc.children(recursive=True)]
    try:
        yield pid, http, address
    finally:
        if proc.is_running():
            os.kill(pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=30)
        for p in alive:
            p.kill()
        assert not alive, f"left behind: {alive}"


def write_app(directory, name: str, greeting: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(f"""
        import fleet

        @fleet.deployment
        class Hello:
            def __init__(self, greeting: str = {greeting!r}) -> None:
                self.greeting = greeting

            def __call__(self, request) -> str:
                return self.greeting

        app = Hello.bind()

        def build(args):
            return Hello.bind(args["greeting"])
    """))


def test_start_apply_status_history_rollback_config_shutdown(started, tmp_path):
    pid, http, _address = started
    write_app(tmp_path, "svc_one", "one")
    config = tmp_path / "fleet.yaml"
    config.write_text(textwrap.dedent("""
        applications:
          - name: one
            route_prefix: /one
            import_path: svc_one:app
          - name: broken
            route_prefix: /broken
            import_path: svc_missing:app
    """))
    # a failing import fails that application only, with the exact error; the rest serves
    out = run("apply", str(config), cwd=str(tmp_path))
    assert out.returncode == 1
    assert "application 'broken' FAILED: application 'broken': cannot import module " \
           "'svc_missing'" in out.stderr
    assert "one/Hello: HEALTHY 1/1" in out.stderr
    assert "application 'one' RUNNING" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("fleet: error: 1 application(s) "
                                                          "failed: broken:")
    assert httpx.get(f"{http}/one").text == "one"

    # a dry run prints the diff and how each change applies, and changes nothing
    config.write_text(textwrap.dedent("""
        applications:
          - name: one
            route_prefix: /one
            import_path: svc_one:app
            deployments:
              - name: Hello
                num_replicas: 2
                max_ongoing_requests: 5
    """))
    out = run("apply", str(config), "--dry-run", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert any(x.startswith("+") and x.strip().endswith("num_replicas: 2")
               for x in out.stdout.splitlines()), out.stdout
    assert "deployments.Hello.num_replicas: (default) -> 2: in place" in out.stdout
    assert "deployments.Hello.max_ongoing_requests: (default) -> 5: rolling restart" \
        in out.stdout
    status = json.loads(run("status", "-o", "json").stdout)
    assert status["applications"]["one"]["deployments"]["Hello"]["target_replicas"] == 1
    assert "broken" not in status["applications"]

    out = run("apply", str(config), cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "one/Hello: HEALTHY 2/2" in out.stderr
    table = run("status", "-o", "table")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == ["APPLICATION", "DEPLOYMENT", "STATUS",
                                                    "REPLICAS", "MESSAGE"]
    assert any(line.split()[:3] == ["Hello", "HEALTHY", "2/2"]
               for line in table.stdout.splitlines())
    assert yaml.safe_load(run("status").stdout)["applications"]["one"]["status"] == "RUNNING"
    assert json.loads(run("status", "--json").stdout)["proxies"]["http"]["port"] > 0

    # new args, then history and rollback (to the config of revision 2)
    config.write_text(config.read_text().replace("import_path: svc_one:app",
                                                 "import_path: svc_one:build\n"
                                                 "    args: {greeting: two}"))
    assert run("apply", str(config), cwd=str(tmp_path)).returncode == 0
    assert httpx.get(f"{http}/one").text == "two"
    history = run("history", "one")
    assert history.returncode == 0
    rows = history.stdout.splitlines()
    assert rows[0].split() == ["REVISION", "DEPLOYED", "STATUS", "SOURCE"]
    assert [r.split()[0] for r in rows[1:]] == ["1", "2", "3"]
    assert rows[-1].split()[3] == "current"
    out = run("rollback", "one", "--to", "2")
    assert out.returncode == 0, out.stderr
    assert httpx.get(f"{http}/one").text == "one"
    assert "rollback to revision 2" in run("history", "one").stdout

    live = yaml.safe_load(run("config", "one").stdout)
    assert live["applications"][0]["import_path"] == "svc_one:app"
    assert "args" not in live["applications"][0]
    assert live["applications"][0]["deployments"][0]["num_replicas"] == 2
    assert one_line_error(run("config", "nosuch")).endswith("running: ['one']")

    # --prune deletes what the file does not name
    other = tmp_path / "other.yaml"
    write_app(tmp_path, "svc_two", "other")
    other.write_text("applications:\n  - {name: two, route_prefix: /two, "
                     "import_path: 'svc_two:app'}\n")
    out = run("apply", str(other), "--prune", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "application 'one': deleting (--prune)" in out.stderr
    assert httpx.get(f"{http}/two").text == "other"

    out = run("shutdown", "-y")
    assert out.returncode == 0, out.stderr
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_shutdown_leaves_no_instance_file_behind(tmp_path):
    """`fleet shutdown` returns once the instance has removed its instance file and its
    socket directory, so the next command finds no instance instead of a dead one."""
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(rundir))
    env.pop("FLEET_ADDRESS", None)
    out = run("start", "--port", "0", "--address", "127.0.0.1:0", env=env)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stderr.splitlines() if "started instance pid" in x)
    proc = psutil.Process(int(line.split("pid ")[1].split(";")[0]))
    family = [proc, *proc.children(recursive=True)]
    try:
        assert (rundir / "fleet" / f"instance-{proc.pid}.json").exists()
        out = run("shutdown", env=env)
        assert out.returncode == 0, out.stderr
        left = sorted(p.name for p in (rundir / "fleet").iterdir()
                      if not p.name.startswith("start-"))      # the log file stays
        assert left == [], left
    finally:
        for p in family:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"left behind: {alive}"


def test_no_instance_bad_address_bad_token(tmp_path):
    # bound but not listening: connections are refused, and no other process can take
    # the port while the test runs
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        _no_instance_bad_address_bad_token(tmp_path, f"127.0.0.1:{held.getsockname()[1]}")


def _no_instance_bad_address_bad_token(tmp_path, nothing: str) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text("applications:\n  - {name: x, import_path: 'apps.cli_apps:app'}\n")
    line = one_line_error(run("apply", str(config), "--address", nothing))
    assert f"nothing answers at http://{nothing}" in line and "fleet start" in line
    env = dict(os.environ, FLEET_ADDRESS=nothing)
    line = one_line_error(run("status", env=env))
    assert "(from FLEET_ADDRESS)" in line
    line = one_line_error(run("status", "--address", "nonsense"))
    assert "is not HOST:PORT" in line
    # no instance of this user anywhere: how to start one (whatever holds port 8100)
    line = one_line_error(run("history", "x"))
    assert "fleet start" in line


def test_wrong_token_and_taken_port(started, tmp_path):
    pid, _http, address = started
    # it records itself in its instance file, token and all, readable only by this user
    path = os.path.join(os.environ["TMPDIR"], f"fleet-{os.getuid()}", f"instance-{pid}.json")
    assert os.stat(path).st_mode & 0o777 == 0o600
    with open(path) as f:
        info = json.load(f)
    assert info["background"] is True and info["management"]["url"] == f"http://{address}"
    assert len(info["token"]) >= 32 and os.path.exists(info["log"])
    line = one_line_error(run("status", "--address", address, "--token", "x" * 20))
    assert "refused the request" in line and "not this instance's" in line
    env = dict(os.environ, FLEET_TOKEN="y" * 20)
    assert "refused the request" in one_line_error(run("status", "--address", address,
                                                       env=env))
    # the same address again: the port is taken
    line = one_line_error(run("start", "--port", "0", "--address", address))
    assert f"the management server cannot listen on {address}" in line
    assert f"(a fleet instance of yours runs there, pid {pid})" in line


def test_status_watch_prints_a_snapshot_every_second(started):
    proc = subprocess.Popen(fleet_cmd("status", "--watch", "-o", "json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=HERE)
    try:
        assert proc.stdout is not None
        marks = 0
        for line in proc.stdout:
            if line.startswith("--- "):
                marks += 1
                if marks == 2:
                    break
        assert marks == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            if proc.poll() is None:     # failed: leave no process for the next test
                proc.kill()
                proc.wait(30)
    assert proc.returncode == 0


def test_apply_bad_yaml_and_unknown_key(started, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: x\n    import_path: [unclosed\n")
    line = one_line_error(run("apply", str(bad)))
    assert "line 4, column 1" in line or "line 3" in line
    bad.write_text("applications:\n  - name: x\n    import_path: a:b\n    replica: 2\n")
    line = one_line_error(run("apply", str(bad)))
    assert "unknown option 'applications.0.replica'" in line and "line 4" in line


def test_run_takes_a_free_management_port_when_its_own_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.Popen(fleet_cmd("run", "apps.cli_apps:app", "--port", "0",
                                          "--address", f"127.0.0.1:{port}"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=HERE, start_new_session=True)
        try:
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "dashboard:" in line:
                    break
            text = "".join(lines)
            assert f"fleet: port {port} is taken; the management API listens on port" in text
            new_port = int(text.split("listens on port ")[1].split()[0])
            assert f"dashboard: http://127.0.0.1:{new_port}/?token=" in text
            # the instance file records it: the CLI finds it without --address
            st = run("status", "-o", "json")
            assert st.returncode == 0, st.stderr
            assert "default" in json.loads(st.stdout)["applications"]
        finally:
            family = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            _, alive = psutil.wait_procs(family, timeout=30)
            assert not alive


def test_apply_says_which_proxy_options_of_the_file_it_does_not_apply(started, tmp_path):
    _pid, http, _address = started
    config = tmp_path / "proxies.yaml"
    config.write_text(textwrap.dedent("""\
        http_options:
          host: 127.0.0.1
          port: 1
        grpc_options:
          grpc_servicer_functions:
            - protos.fleet_greet_pb2_grpc.add_GreetServiceServicer_to_server
        applications:
          - name: app
            route_prefix: /app
            import_path: apps.cli_apps:app
    """))
    out = run("apply", str(config), "--app-dir", HERE)     # port 1: never the instance's
    assert out.returncode == 0, out.stderr
    notes = [ln for ln in out.stderr.splitlines() if "not applied" in ln]
    assert notes == [
        f"fleet: {config}: not applied, as fleet apply changes applications only: "
        "http_options.port, grpc_options (no gRPC proxy runs) (the running instance's "
        f"differ); proxy options take effect when an instance starts (`fleet run {config}` "
        f"or `fleet start {config}`)"], out.stderr
    assert httpx.get(f"{http}/app").status_code == 200
    # options the instance has already, and a file without any, say nothing
    config.write_text(textwrap.dedent("""\
        http_options:
          host: 127.0.0.1
        applications:
          - name: app
            route_prefix: /app
            import_path: apps.cli_apps:app
    """))
    out = run("apply", str(config), "--app-dir", HERE)
    assert out.returncode == 0 and "not applied" not in out.stderr, out.stderr


def test_build_writes_a_config_apply_takes_back_unchanged(started, tmp_path):
    _pid, http, _address = started
    out_file = tmp_path / "built.yaml"
    out = run("build", "apps.cli_apps:app", "apps.manage_apps:composed", "-o", str(out_file))
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out_file.read_text())
    assert [a["name"] for a in config["applications"]] == ["app", "composed"]
    front = config["applications"][1]["deployments"][0]
    assert front["name"] == "Front" and front["max_ongoing_requests"] == 100
    assert "startup_timeout_s" in front and config["http_options"]["port"] == 8000
    out = run("apply", str(out_file), "--app-dir", HERE)
    assert out.returncode == 0, out.stderr
    assert httpx.get(f"{http}/composed").text == "COMPOSED"
    out = run("apply", str(out_file), "--app-dir", HERE, "--dry-run")
    assert out.stdout.splitlines() == ["application 'app': unchanged",
                                       "application 'composed': unchanged"]
    line = one_line_error(run("build", "apps.cli_apps:nothing"))
    assert "has no attribute 'nothing'" in line


def test_schema_lists_every_option():
    from fleet._config import DEPLOYMENT_OPTIONS, RAY_ONLY_KEYS
    out = run("schema")
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    override = schema["$defs"]["DeploymentOverride"]
    assert set(override["properties"]) == DEPLOYMENT_OPTIONS | RAY_ONLY_KEYS["deployment"]
    assert override["additionalProperties"] is False
    assert "http_options" in schema["properties"] and "applications" in schema["properties"]


def test_ray_keys_are_accepted_with_one_warning_and_unknown_keys_suggest(tmp_path):
    ray = tmp_path / "ray.yaml"
    ray.write_text(textwrap.dedent("""
        proxy_location: EveryNode
        target_capacity: 100
        http_options: {host: 127.0.0.1, port: 8000}
        applications:
          - name: app1
            route_prefix: /
            import_path: apps.cli_apps:app
            runtime_env: {pip: [requests]}
            deployments:
              - name: Hello
                num_replicas: 2
                max_replicas_per_node: 1
                graceful_shutdown_wait_loop_s: 2
    """))
    with socket.socket() as held:      # nothing answers there: a dry run needs no one
        held.bind(("127.0.0.1", 0))
        out = run("apply", str(ray), "--dry-run", "--address",
                  f"127.0.0.1:{held.getsockname()[1]}")
    warnings = [x for x in out.stderr.splitlines() if "warning" in x]
    assert warnings == [f"fleet: warning: config {str(ray)!r}: fleet ignores these Ray Serve "
                        "keys: target_capacity, "
                        "applications.0.deployments.0.graceful_shutdown_wait_loop_s"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - import_path: apps.cli_apps:app\n    deployments:\n"
                   "      - {name: Hello, num_replica: 2}\n")
    line = one_line_error(run("apply", str(bad)))
    assert "line 4" in line and "did you mean 'num_replicas'?" in line
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("http_options:\n  port: eighty\n")
    line = one_line_error(run("apply", str(wrong)))
    assert "line 2" in line and "http_options.port must be a whole number" in line


@pytest.mark.parametrize("grpc,expected", [("{port: 0}", False),
                                           ("{port: 0, enabled: true}", True)])
def test_grpc_options_alone_do_not_start_the_grpc_proxy(tmp_path, grpc, expected):
    """As the README says: in YAML, grpc_options start the gRPC proxy only with
    enabled: true (or grpc_servicer_functions, or --grpc-port)."""
    config = tmp_path / "fleet.yaml"
    config.write_text(f"grpc_options: {grpc}\napplications:\n"
                      "  - {name: g, import_path: 'apps.cli_apps:app'}\n")
    proc = subprocess.Popen(fleet_cmd("run", str(config), "--port", "0", "--address",
                                      "127.0.0.1:0", "--app-dir", HERE),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=HERE, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "dashboard:" in line:
                break
        st = json.loads(run("status", "--json").stdout)
        assert ("grpc" in st["proxies"]) is expected
    finally:
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive


def test_start_help_says_where_its_management_api_listens():
    # fleet start makes an instance: its --address is where the API listens, not the
    # FLEET_ADDRESS or newest instance the other commands look for
    out = run("start", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "--address HOST:PORT Where the management API listens (default: 127.0.0.1:8100;" \
        in text, text
    assert "FLEET_ADDRESS" not in text and "newest instance" not in text


def test_start_that_cannot_serve_says_why_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run("start", "--port", str(port), "--address", "127.0.0.1:0")
    line = one_line_error(out)
    assert f"the HTTP proxy cannot listen on 127.0.0.1:{port}" in line and "(log: " in line


def test_shutdown_stops_a_fleet_run_too(tmp_path):
    proc = subprocess.Popen(fleet_cmd("run", "apps.cli_apps:app", "--port", "0",
                                      "--address", "127.0.0.1:0"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=HERE, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "dashboard:" in line:
                break
        family = psutil.Process(proc.pid).children(recursive=True)
        out = run("shutdown")
        assert out.returncode == 0, out.stderr
        assert f"instance pid {proc.pid} stopped" in out.stderr
        assert proc.wait(60) == 0
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_background_log_is_bounded(tmp_path):
    out = run("start", "--port", "0", "--address", "127.0.0.1:0", "--max-log-bytes", "10000")
    assert out.returncode == 0, out.stderr
    address = _management_address(out.stderr)
    pid = int(out.stderr.split("started instance pid ")[1].split(";")[0])
    log = out.stderr.split("(log: ")[1].split(")")[0]
    family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    try:
        with open(log, "a") as f:
            f.write("x" * 20000 + "\n")
        from helpers import wait_for
        wait_for(lambda: "was cut back" in open(log).read(), 30)
        assert os.path.getsize(log) < 10000
    finally:
        assert run("shutdown", "--address", address).returncode == 0
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive


def test_start_with_a_config_serves_its_proxy_options_and_applications(tmp_path):
    """`fleet start fleet.yaml`: the file's grpc_options (a schema of the user's, which
    `fleet apply` cannot add to a running instance) start with the instance, and its
    applications are applied."""
    import grpc
    from protos import fleet_echo_pb2 as pb
    from protos import fleet_echo_pb2_grpc as pb_grpc
    (tmp_path / "echo_app.py").write_text(textwrap.dedent("""
        import fleet
        from apps.observe_apps import GrpcEcho

        echo = GrpcEcho.bind()
    """))
    config = tmp_path / "fleet.yaml"
    config.write_text(textwrap.dedent("""
        http_options: {host: 127.0.0.1, port: 0}
        grpc_options:
          port: 0
          grpc_servicer_functions: [protos.fleet_echo_pb2_grpc.add_EchoServiceServicer_to_server]
        applications:
          - name: echo
            route_prefix: /echo
            import_path: echo_app:echo
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    out = run("start", str(config), "--address", "127.0.0.1:0", env=env)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stderr.splitlines() if "started instance pid" in x)
    proc = psutil.Process(int(line.split("pid ")[1].split(";")[0]))
    family = [proc, *proc.children(recursive=True)]
    address = _management_address(line)
    try:
        status = json.loads(run("status", "-o", "json", "--address", address).stdout)
        assert status["applications"]["echo"]["status"] == "RUNNING"
        port = status["proxies"]["grpc"]["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = pb_grpc.EchoServiceStub(channel).Say(
                pb.EchoRequest(text="hi"), metadata=(("application", "echo"),), timeout=30)
        assert reply.text.split()[0]          # the call's request id: it ran in the app
        assert run("shutdown", "--address", address).returncode == 0
    finally:
        if proc.is_running():
            proc.terminate()
        _, alive = psutil.wait_procs(family, timeout=30)
        for p in alive:
            p.kill()
    assert not alive, alive


def test_start_with_a_bad_config_starts_nothing_and_says_why(tmp_path):
    config = tmp_path / "fleet.yaml"
    config.write_text("http_options:\n  prot: 0\n")
    out = run("start", str(config), "--address", "127.0.0.1:0")
    assert out.returncode == 1
    line = one_line_error(out)
    assert "line 2" in line and "did you mean 'port'?" in line
    assert "started instance" not in out.stderr
