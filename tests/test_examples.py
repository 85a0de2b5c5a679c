"""The README's examples are files in examples/; each one runs here."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx

import fleet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks() -> dict[str, str]:
    """Code blocks of the README that start with '# examples/<name>.py'."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = {}
    for body in re.findall(r"```python\n(.*?)```", text, re.S):
        first = body.splitlines()[0]
        if first.startswith("# examples/"):
            blocks[first[2:].strip()] = body
    return blocks


def test_readme_examples_are_the_files_in_examples():
    blocks = readme_blocks()
    assert "examples/quickstart.py" in blocks
    for path, body in blocks.items():
        with open(os.path.join(ROOT, path)) as f:
            assert f.read() == body, f"README's copy of {path} differs from the file"


def test_quickstart_serves_over_http_and_handles(instance):
    sys.path.insert(0, ROOT)
    from examples.quickstart import app
    handle = fleet.run(app)
    r = httpx.get(f"{instance.http_url}/?x=1")
    assert r.json() == {"x": 1, "total": 5}
    st = fleet.status()["applications"]["default"]["deployments"]
    assert all(rep["state"] == "RUNNING" for d in st.values() for rep in d["replicas"])
    assert handle is not None


def test_handles_example_runs():
    fleet.shutdown()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "handles.py")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "RUNNING" in out.stdout
