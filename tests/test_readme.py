"""The README's claims about the core that no other test pins: the options table, the
YAML example, the set-up commands, and the quick start run as its first command says."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import httpx
import psutil
import yaml

from fleet._config import DeploymentConfig, FleetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _section(title: str) -> str:
    text = _readme()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_options_table_lists_every_option_with_its_default():
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|", _section("Deployments"), re.M)
    table = dict(rows)
    assert set(table) == set(DeploymentConfig.model_fields)
    defaults = DeploymentConfig(name="x")
    for option, shown in table.items():
        if option == "name":
            continue
        value = re.match(r"`([^`]*)`", shown)
        assert value, f"README gives no default for {option}: {shown}"
        assert value.group(1) == repr(getattr(defaults, option)).replace(".0", ""), option


def test_yaml_example_is_a_valid_config():
    block = re.search(r"```yaml\n(.*?)```", _section("The command line"), re.S)
    assert block
    config = FleetConfig(**yaml.safe_load(block.group(1)))
    app = config.applications[0]
    assert (app.name, app.route_prefix, app.args) == ("greeter", "/greet",
                                                      {"greeting": "bonjour"})
    assert app.deployments[0].overrides() == {"num_replicas": 2}


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", _section("Set up a fresh machine"), re.S)
    assert len(commands) == 2, "exactly two set-up commands"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert lines[-1].endswith(commands[1])
    assert commands[0] == "pip install -e . && fleet run examples.quickstart:app"


def test_quick_start_command_serves_and_status_shows_every_replica_running(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))     # this instance's record, and no other
    proc = subprocess.Popen([sys.executable, "-m", "fleet", "run", "examples.quickstart:app",
                             "--port", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        port = None
        for line in proc.stdout:
            m = re.search(r"fleet: HTTP on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "fleet run exited before serving"
        assert httpx.get(f"http://127.0.0.1:{port}/?x=1").json() == {"x": 1, "total": 5}
        out = subprocess.run([sys.executable, "-m", "fleet", "status", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        deps = json.loads(out.stdout)["applications"]["default"]["deployments"]
        states = [r["state"] for d in deps.values() for r in d["replicas"]]
        assert states == ["RUNNING"] * 5
    finally:
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive


def test_serving_guide_snippets_are_taken_from_the_examples_the_tests_run():
    with open(os.path.join(ROOT, "docs", "serving.md")) as f:
        text = f.read()
    found = re.findall(r"```python\n(.*?)```\n\n\(`(examples/\w+\.py)`\.\)", text, re.S)
    assert len(found) == 3
    for snippet, path in found:
        with open(os.path.join(ROOT, path)) as f:
            source = f.read()
        # the snippet may leave out lines (comments, the script part), never change them
        lines = iter(source.splitlines())
        for line in snippet.strip().splitlines():
            assert any(line.strip() == s.strip() for s in lines), (path, line)
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block
    policy = FleetConfig(**yaml.safe_load(block.group(1))).traffic[0]
    assert (policy.route_prefix, policy.weights, policy.shadow) == (
        "/hello", {"app_v1": 0.9, "app_v2": 0.1}, {"app_v3": 0.2})


def test_instances_started_with_defaults_serve_http_on_localhost_8000():
    from fleet._config import HTTPOptions
    assert "HTTP on 127.0.0.1:8000" in _section("Running applications")
    assert (HTTPOptions().host, HTTPOptions().port) == ("127.0.0.1", 8000)


def test_management_api_snippet_runs_as_a_script_outside_the_repository(tmp_path):
    # pasted into a file of its own, run from the repository root as the text says: the
    # script's directory, not the root, is on its sys.path, so app_dir must reach the server
    text = _section("Operating fleet")
    start = text.index("```python\nimport os\nimport secrets\n")
    snippet = text[start + len("```python\n"):text.index("```", start + 3)]
    script = tmp_path / "manage.py"
    script.write_text(snippet)
    env = dict(os.environ, TMPDIR=str(tmp_path))     # this instance's record, and no other
    env.pop("XDG_RUNTIME_DIR", None)
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120,
                         start_new_session=True)
    assert out.returncode == 0, out.stderr
