"""The HTTP examples (the FAQ's among them) run as scripts, unchanged, and print what
their comments say."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED = {
    "faq_call_method": ["{'current': 6}", "{'current': 10}", "404 nope"],
    "faq_status_code": ["123 Hello, world!"],
    "faq_cors": ["200 *", "hello"],
    "faq_serve_request": ["Request coming from web!", "Request coming from Python!",
                          "HTTP and handle calls read alike", "[1, 2, 3]",
                          "{'via': 'front'}"],
    "http_fastapi": ["{'count': 15}", "422", "dict_keys(['/add/{n}'])", "count: 15"],
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, subprocess.CompletedProcess[str]]:
    # All at once: each is a separate instance on its own free port.
    # (each with a runtime location of its own, or they would share the first one's)
    procs = {name: subprocess.Popen([sys.executable, os.path.join("examples", f"{name}.py")],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=dict(os.environ,
                                                        TMPDIR=str(tmp_path_factory.mktemp(name))))
             for name in EXPECTED}
    done = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_and_prints_what_it_says(outputs, name):
    result = outputs[name]
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for expected in EXPECTED[name]:
        assert expected in lines, f"{name}: {expected!r} not in {lines}"
