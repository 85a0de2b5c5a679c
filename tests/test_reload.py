"""`fleet run --reload`: a change rolls only what changed; a broken change keeps the
previous version serving and says why once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import httpx
import psutil
import pytest

SOURCE = textwrap.dedent('''\
    import os

    import fleet


    @fleet.deployment
    class Keeper:
        def __call__(self) -> int:
            return os.getpid()


    @fleet.deployment
    class Changer:
        def __init__(self, keeper) -> None:
            self.keeper = keeper
            {init}

        async def __call__(self, request) -> str:
            return f"{answer} {{await self.keeper.remote()}}"


    app = Changer.bind(Keeper.bind())
''')


def write(path, answer: str, init: str = "pass") -> None:
    replace(path, SOURCE.format(answer=answer, init=init))


def replace(path, text: str) -> None:
    """Write the file whole, as an editor saving it does: the watcher polls modification
    times, and a write in place could be seen truncated (an empty module) by a poll that
    falls between the truncation and the write on a slow machine."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    appdir = tmp_path / "app"
    appdir.mkdir()
    module = appdir / "reloadable.py"
    write(module, "v1")
    proc = subprocess.Popen([sys.executable, "-m", "fleet", "run", "reloadable:app",
                             "--app-dir", str(appdir), "--port", "0", "--reload"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=str(appdir))
    assert proc.stderr is not None
    port = None
    for line in proc.stderr:
        m = re.search(r"fleet: HTTP on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        if "press Ctrl-C" in line:
            break
    assert port, "fleet run --reload exited before serving"
    try:
        yield proc, module, f"http://127.0.0.1:{port}/"
    finally:
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive


def lines_until(proc: subprocess.Popen[str], marker: str) -> list[str]:
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        if line.startswith("fleet:"):         # not the access log's lines
            seen.append(line.rstrip("\n"))
        if marker in line:
            return seen
    raise AssertionError("fleet run ended before " + repr(marker) + ":\n" + "\n".join(seen))


def test_reload_rolls_only_the_changed_deployment(served):
    proc, module, url = served
    answer, keeper_pid = httpx.get(url).text.split()
    assert answer == "v1"
    write(module, "v2")
    lines = lines_until(proc, "fleet: reloaded:")
    assert lines[0] == f"fleet: {os.path.relpath(str(module), str(module.parent))} changed; " \
                       "reloading"
    assert lines[-1] == "fleet: reloaded: rolled default/Changer; kept default/Keeper"
    answer, pid = httpx.get(url).text.split()
    assert (answer, pid) == ("v2", keeper_pid), "the unchanged deployment kept its replica"


@pytest.mark.parametrize("broken,why", [
    (lambda m: replace(m, "import fleet\ndef broken(:\n"), "SyntaxError"),
    (lambda m: write(m, "v3", init="raise RuntimeError('no weights')"),
     "raised RuntimeError: no weights"),
])
def test_a_broken_change_keeps_the_previous_version_serving(served, broken, why):
    proc, module, url = served
    assert httpx.get(url).text.startswith("v1 ")
    broken(module)
    lines = lines_until(proc, "reload failed")
    errors = [ln for ln in lines if ln.startswith("fleet: error:")]
    assert len(errors) == 1 and why in errors[0], lines
    assert lines[-1] == "fleet: reload failed; the previous version keeps serving"
    assert httpx.get(url).text.startswith("v1 ")
    write(module, "v4")
    lines_until(proc, "fleet: reloaded:")
    assert httpx.get(url).text.startswith("v4 ")
