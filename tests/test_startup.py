"""Start-up that ends: startup_timeout_s fails a deployment whose replica never gets
ready, `fleet run` and `fleet.run` answer signals while starting, and every process
fleet starts dies with its parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from apps.cli_apps import Hanging
from helpers import wait_for

import fleet

HERE = os.path.dirname(__file__)


@fleet.deployment
class LoopUser:
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()      # constructors run on the replica's loop
        self.task = loop.create_task(asyncio.sleep(0, result="from the loop"))

    async def __call__(self) -> str:
        return await self.task


def _env(tmp_path: Path, pidfile: Path) -> dict[str, str]:
    return dict(os.environ, TMPDIR=str(tmp_path), FLEET_TEST_PIDFILE=str(pidfile),
                XDG_RUNTIME_DIR="")


def _gone(pid: int, timeout_s: float = 15.0) -> bool:
    try:
        psutil.Process(pid).wait(timeout_s)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def _started_with(pidfile: Path, but: set[int]) -> list[psutil.Process]:
    """Processes still running that were started with FLEET_TEST_PIDFILE=pidfile (the
    test's replicas, whether or not their constructor got to write the file), but the
    ones in `but`."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid in but or proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("FLEET_TEST_PIDFILE") == str(pidfile) \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _replicas_gone(pidfile: Path, but: set[int] | None = None) -> None:
    """The replica whose start-up timed out is gone. startup_timeout_s=1 counts from the
    process's start: on a loaded machine it can pass before the constructor writes the
    pid file, so the processes are found by their environment, and the pid file's process
    (one that got to hang, ignoring SIGTERM) is checked when there is one."""
    if pidfile.exists():
        assert _gone(int(pidfile.read_text()))
    wait_for(lambda: not _started_with(pidfile, but or set()), 15,
             what=f"every process started with FLEET_TEST_PIDFILE={pidfile} to exit")


def test_startup_timeout_fails_the_deployment_and_kills_the_replica(tmp_path, monkeypatch):
    pidfile = tmp_path / "pid"
    monkeypatch.setenv("FLEET_TEST_PIDFILE", str(pidfile))
    fleet.shutdown()
    fleet.start(http_options={"port": 0})
    try:
        with pytest.raises(fleet.DeploymentFailedError, match="startup_timeout_s=1"):
            fleet.run(Hanging.options(startup_timeout_s=1).bind(), name="hang",
                      route_prefix=None)
        dep = fleet.status()["applications"]["hang"]["deployments"]["Hanging"]
        assert dep["status"] == "DEPLOY_FAILED"
        assert "was not ready within startup_timeout_s=1" in dep["message"]
        # killed, though it ignores SIGTERM; the proxy, started with the same
        # environment, runs on
        proxies = {int(pid) for p in fleet.status()["proxies"].values()
                   for pid in p.get("pids", [p["pid"]])}
        _replicas_gone(pidfile, proxies)
        # constructors that use the running loop keep working
        assert fleet.run(LoopUser.bind(), name="loop", route_prefix=None).remote().result() \
            == "from the loop"
    finally:
        fleet.shutdown()


def test_startup_timeout_is_a_yaml_option(tmp_path):
    from fleet._config import DeploymentConfig, DeploymentOverride
    assert DeploymentConfig(name="x").startup_timeout_s == 300
    assert DeploymentOverride(name="x", startup_timeout_s=5).overrides() == \
        {"startup_timeout_s": 5}
    with pytest.raises(ValueError, match="startup_timeout_s"):
        Hanging.options(startup_timeout_s=0)


def test_fleet_run_exits_1_when_start_up_times_out(tmp_path):
    pidfile = tmp_path / "pid"
    out = subprocess.run([sys.executable, "-m", "fleet", "run", "apps.cli_apps:hanging",
                          "--app-dir", HERE, "--port", "0"], capture_output=True, text=True,
                         env=_env(tmp_path, pidfile), timeout=120)
    assert out.returncode == 1
    assert "startup_timeout_s=1" in out.stderr
    _replicas_gone(pidfile)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_fleet_run_answers_a_signal_while_a_constructor_hangs(tmp_path, sig):
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen([sys.executable, "-m", "fleet", "run", "apps.cli_apps:hanging_long",
                             "--app-dir", HERE, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(tmp_path, pidfile),
                            start_new_session=True)
    try:
        wait_for(pidfile.exists, 60)
        family = psutil.Process(proc.pid).children(recursive=True)
        replica = int(pidfile.read_text())
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 1, out
        assert "interrupted while starting" in out
        assert _gone(replica)
        _, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_fleet_run_blocking_answers_sigterm_while_starting(tmp_path):
    pidfile = tmp_path / "pid"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {HERE!r})
        import fleet
        from apps.cli_apps import Hanging
        fleet.start(http_options={{"port": 0}})
        try:
            fleet.run(Hanging.bind(), blocking=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=_env(tmp_path, pidfile))
    try:
        wait_for(pidfile.exists, 60)
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 3 and "interrupted" in out
        _, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigkill_of_the_driver_leaves_no_replica_or_proxy(tmp_path):
    pidfile = tmp_path / "pid"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {HERE!r})
        import fleet
        from apps.cli_apps import Hanging
        fleet.start(http_options={{"port": 0}})
        print(fleet.status()["proxies"]["http"]["pid"], flush=True)
        fleet.run(Hanging.bind())
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=_env(tmp_path, pidfile))
    try:
        assert proc.stdout is not None
        proxy = int(proc.stdout.readline())
        wait_for(pidfile.exists, 60)
        replica = int(pidfile.read_text())
        assert psutil.pid_exists(proxy) and psutil.pid_exists(replica)
        proc.kill()                     # SIGKILL: no atexit, no shutdown, nothing
        proc.wait(10)
        started = time.monotonic()
        assert _gone(replica) and _gone(proxy)
        assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_lifeline_pipe_alone_kills_a_child_whose_parent_died(tmp_path):
    """Where prctl is not available: the pipe's end of file kills the child, even one
    that ignores SIGTERM and never returns to an event loop."""
    pidfile = tmp_path / "child"
    parent = tmp_path / "parent.py"
    parent.write_text(textwrap.dedent(f"""
        import subprocess, sys
        from fleet._backends.lifeline import Lifeline
        line = Lifeline()
        child = '''
        import os, signal, sys, time
        from fleet._backends import lifeline
        lifeline._PR_SET_PDEATHSIG = -1      # prctl fails: only the pipe is left
        lifeline.hold(sys.argv)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        while True:
            time.sleep(1)
        '''
        subprocess.Popen([sys.executable, "-c", child, *line.child_args()],
                         pass_fds=(line.read_fd,))
        sys.stdin.read()
    """))
    proc = subprocess.Popen([sys.executable, str(parent)], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), 30)
        child = int(pidfile.read_text())
        proc.kill()
        proc.wait(10)
        assert _gone(child)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
