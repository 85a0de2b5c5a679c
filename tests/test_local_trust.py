"""Local trust: a private runtime directory checked on every use, one instance file per
instance written safely, and a data plane where both sides prove they hold the secret
(never sending it), check the peer's uid, and unpickle nothing before."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fleet
from fleet import _rundir
from fleet._wire import auth, frames
from fleet._wire.channel import connect
from fleet._wire.listener import listen

OTHER_UID = 54321
as_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to create another "
                                                      "user's files (os.chown)")


def _other_users_python() -> str:
    """An interpreter another uid may run (a virtualenv under /root is not one)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        try:
            subprocess.run([candidate, "-c", "pass"], user=OTHER_UID, check=True,
                           timeout=30, capture_output=True)
            return candidate
        except (OSError, subprocess.SubprocessError):
            continue
    pytest.skip("no Python interpreter that another uid may run")


@pytest.fixture
def rundir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_RUNTIME_DIR points at a fresh directory: fleet's runtime dir is <it>/fleet."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "fleet"


def _cli_env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))


class _Bomb:
    """Unpickling this writes a marker file: proof that a process unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.write_text, (Path(self.marker), "unpickled"))


# -- the runtime directory and its files -------------------------------------------
def test_instance_records_itself_in_a_private_dir_and_removes_its_file(rundir):
    fleet.shutdown()
    fleet.start(http_options={"port": 0})
    try:
        st = os.lstat(rundir)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        path = rundir / f"instance-{os.getpid()}.json"
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid()
        # the sockets' directory: in the runtime dir, or in /tmp when that path would be
        # too long for a Unix socket; private either way
        sockets = os.path.dirname(info["address"][len("unix:"):])
        assert sockets.startswith(f"{rundir}/") or len(f"{rundir}/") > 60
        st = os.lstat(sockets)
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
        assert not [p for p in os.listdir(rundir) if p.endswith(".tmp")]
    finally:
        fleet.shutdown()
    assert not path.exists()


@pytest.mark.parametrize("make_unsafe, says", [
    (lambda d: os.chmod(d, 0o770), "has mode 0770"),
    (lambda d: os.chmod(d, 0o705), "has mode 0705"),
])
def test_a_runtime_dir_open_to_others_is_refused(rundir, make_unsafe, says):
    os.mkdir(rundir, 0o700)
    make_unsafe(rundir)
    fleet.shutdown()
    with pytest.raises(fleet.FleetError, match=says):
        fleet.start(http_options={"port": 0})
    fleet.shutdown()


def test_a_symlinked_runtime_dir_is_refused(rundir, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, rundir)
    with pytest.raises(_rundir.UnsafeRuntimeDirError, match="symbolic link"):
        _rundir.runtime_dir()


@as_root
def test_another_users_runtime_dir_is_refused_by_start_and_status(rundir, tmp_path):
    os.mkdir(rundir, 0o700)
    # what an attacker would leave there: an instance file pointing at their server
    (rundir / "instance-1.json").write_text(json.dumps(
        {"address": "unix:/nowhere.sock", "secret": "00" * 32, "pid": 1}))
    os.chown(rundir / "instance-1.json", OTHER_UID, OTHER_UID)
    os.chown(rundir, OTHER_UID, OTHER_UID)
    fleet.shutdown()
    with pytest.raises(fleet.FleetError, match=f"owned by uid {OTHER_UID}, not by you"):
        fleet.start(http_options={"port": 0})
    fleet.shutdown()
    out = subprocess.run([sys.executable, "-m", "fleet", "status"], capture_output=True,
                         text=True, env=_cli_env(tmp_path), timeout=60)
    assert out.returncode == 1
    assert f"owned by uid {OTHER_UID}" in out.stderr and "XDG_RUNTIME_DIR" in out.stderr


@as_root
def test_another_users_instance_file_in_a_private_dir_is_ignored(rundir):
    os.mkdir(rundir, 0o700)
    planted = rundir / f"instance-{os.getpid()}.json"
    planted.write_text(json.dumps({"address": "unix:/x.sock", "secret": "00", "pid": 1}))
    os.chown(planted, OTHER_UID, OTHER_UID)
    assert _rundir.live_instances() == []


def test_private_files_are_written_exclusively_and_never_through_symlinks(rundir, tmp_path):
    directory = _rundir.runtime_dir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, os.path.join(directory, "link.json"))
    # rename replaces the link itself; the file it pointed at is untouched
    _rundir.write_private(directory, "link.json", b"new")
    assert victim.read_text() == "keep"
    assert not os.path.islink(os.path.join(directory, "link.json"))
    assert _rundir.read_private(os.path.join(directory, "link.json")) == b"new"
    os.symlink(victim, os.path.join(directory, "other.json"))
    assert _rundir.read_private(os.path.join(directory, "other.json")) is None


def _fleet_run(tmp_path: Path) -> subprocess.Popen[str]:
    here = os.path.dirname(__file__)
    return subprocess.Popen(
        [sys.executable, "-m", "fleet", "run", "apps.cli_apps:app", "--app-dir", here,
         "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_cli_env(tmp_path))


def _wait_serving(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if "press Ctrl-C" in line:
            return
    raise AssertionError("fleet run exited before serving")


def test_two_instances_keep_their_own_files_and_status_says_which_it_uses(rundir, tmp_path):
    os.makedirs(rundir, 0o700)
    stale = rundir / "instance-999999999.json"          # no such process
    stale.write_text(json.dumps({"address": "unix:/gone.sock", "secret": "00", "pid":
                                 999999999, "started": 0}))
    os.chmod(stale, 0o600)
    procs = [_fleet_run(tmp_path), _fleet_run(tmp_path)]
    try:
        for proc in procs:
            _wait_serving(proc)
        files = sorted(p for p in os.listdir(rundir) if p.startswith("instance-"))
        assert files == sorted(f"instance-{p.pid}.json" for p in procs)   # stale one gone
        out = subprocess.run([sys.executable, "-m", "fleet", "status"], capture_output=True,
                             text=True, env=_cli_env(tmp_path), timeout=60)
        assert out.returncode == 0, out.stderr
        newest = max(procs, key=lambda p: json.loads(
            (rundir / f"instance-{p.pid}.json").read_text())["started"])
        assert f"2 instances are running; talking to the newest, pid {newest.pid}" \
            in out.stderr
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
    assert not [p for p in os.listdir(rundir) if p.startswith("instance-")]


# -- the handshake ---------------------------------------------------------------------
class _Recorder:
    """A listener Handler that records calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_call(self, conn, call_id, method, args, kwargs, meta) -> None:
        self.calls.append(method)
        conn.reply(call_id, f"ran {method}")

    def on_cancel(self, conn, call_id) -> None: ...
    def on_data(self, conn, call_id, obj) -> None: ...
    def on_ctrl(self, conn, msg) -> None: ...
    def on_closed(self, conn) -> None: ...


async def _raw_exchange(path: str, data: bytes, read: bool = True) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    await writer.drain()
    got = await asyncio.wait_for(reader.read(), 10) if read else b""
    writer.close()
    return got


def test_mutual_auth_completes_and_the_secret_never_crosses_the_socket(tmp_path):
    secret = os.urandom(32)
    sent: list[bytes] = []

    async def go() -> str:
        path = str(tmp_path / "s.sock")
        server = await listen(_Recorder(), secret, f"unix:{path}")
        ch = await connect(f"unix:{path}", secret)
        transport = ch.transport
        assert transport is not None
        real_write = transport.write

        def spy(data: bytes) -> None:
            sent.append(bytes(data))
            real_write(data)

        transport.write = spy  # type: ignore[method-assign]
        result = await ch.call("hello", (), {}, None).result()
        ch.close()
        server.close()
        return str(result)

    assert asyncio.run(go()) == "ran hello"
    assert sent and not any(secret in chunk for chunk in sent)


def test_a_caller_without_the_secret_is_refused_before_anything_is_unpickled(tmp_path):
    secret = os.urandom(32)
    marker = tmp_path / "unpickled"
    recorder = _Recorder()

    async def go() -> list[bytes]:
        path = str(tmp_path / "s.sock")
        server = await listen(recorder, secret, f"unix:{path}")
        bomb = frames.encode_raw(frames.CALL, 1, pickle.dumps(
            ("x", (_Bomb(str(marker)),), {}, None)))
        answers = [
            # a CALL before any AUTH: closed at once, nothing answered
            await _raw_exchange(path, bomb),
            # the old protocol (the raw secret as AUTH) is not a valid hello
            await _raw_exchange(path, frames.encode_raw(frames.AUTH, 0, secret)),
            # a 2 GiB frame header before authentication: closed, never buffered
            await _raw_exchange(path, frames.HEADER.pack(1 << 31, frames.AUTH, 0)),
        ]
        # a valid hello, then a wrong proof, then the bomb
        _nonce, hello = auth.hello()
        answers.append(await _raw_exchange(
            path, frames.encode_raw(frames.AUTH, 0, hello)
            + frames.encode_raw(frames.AUTH, 0, b"\0" * 32) + bomb))
        # a caller holding the wrong secret gets a clear error, not a hang
        with pytest.raises(ConnectionError, match="did not prove"):
            await connect(f"unix:{path}", os.urandom(32))
        server.close()
        return answers

    answers = asyncio.run(go())
    assert answers[:3] == [b"", b"", b""]
    assert len(answers[3]) == frames.HEADER_SIZE + 64      # only the server's AUTH reply
    assert not marker.exists() and recorder.calls == []


def test_a_caller_that_never_authenticates_is_disconnected(tmp_path, monkeypatch):
    from fleet._wire import listener
    monkeypatch.setattr(listener, "AUTH_TIMEOUT_S", 0.2)

    async def go() -> bytes:
        path = str(tmp_path / "s.sock")
        server = await listen(_Recorder(), os.urandom(32), f"unix:{path}")
        reader, writer = await asyncio.open_unix_connection(path)
        got = await asyncio.wait_for(reader.read(), 10)    # EOF: the server closed it
        writer.close()
        server.close()
        return got

    assert asyncio.run(go()) == b""


def test_the_caller_unpickles_nothing_from_a_server_that_has_not_proved_itself(
        rundir, tmp_path):
    """The attack from the issue: an instance file pointing at someone else's server,
    which answers with a pickle that runs code. A process attaching to it (as
    fleet.status() does) refuses it instead; `fleet status` speaks only JSON over HTTP to
    the management API, and this file names none, so it does not connect at all."""
    marker = tmp_path / "unpickled"
    sock = str(tmp_path / "evil.sock")
    script = tmp_path / "evil.py"
    script.write_text(textwrap.dedent(f"""
        import pickle, socket, struct, sys
        from pathlib import Path
        class Bomb:
            def __reduce__(self):
                return (Path.write_text, (Path({str(marker)!r}), "unpickled"))
        payload = pickle.dumps(Bomb())
        s = socket.socket(socket.AF_UNIX)
        s.bind({sock!r}); s.listen(1)
        print("ready", flush=True)
        conn, _ = s.accept()
        for kind in (1, 3, 7):  # as AUTH, as OK, as CTRL
            conn.sendall(struct.pack("!IBQ", len(payload), kind, 0) + payload)
        conn.recv(1 << 16)
    """))
    evil = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert evil.stdout is not None and evil.stdout.readline().strip() == "ready"
        directory = _rundir.runtime_dir()
        _rundir.write_private(directory, f"instance-{evil.pid}.json", json.dumps(
            {"address": f"unix:{sock}", "secret": "00" * 32, "pid": evil.pid,
             "started": 1}).encode())
        attach = textwrap.dedent(f"""
            import asyncio
            from fleet._runtime import Runtime
            async def go():
                rt = Runtime(asyncio.get_running_loop(), "unix:{sock}", bytes(32))
                await rt.connect_controller(subscribe=False)
            asyncio.run(go())
        """)
        out = subprocess.run([sys.executable, "-c", attach], capture_output=True,
                             text=True, env=_cli_env(tmp_path), timeout=60)
        cli = subprocess.run([sys.executable, "-m", "fleet", "status", "--address",
                              "127.0.0.1:1"], capture_output=True, text=True,
                             env=_cli_env(tmp_path), timeout=60)
    finally:
        evil.kill()
        evil.wait(10)
    assert out.returncode == 1
    assert "closed the connection before fleet's authentication completed" in out.stderr
    assert cli.returncode == 1 and "nothing answers at" in cli.stderr
    assert not marker.exists()


# -- peer credentials -------------------------------------------------------------------
@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fleet-test-", dir="/tmp"))  # not under a private tmp
    os.chmod(path, 0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@as_root
def test_a_listener_refuses_a_peer_running_as_another_user(shared_dir):
    path = str(shared_dir / "s.sock")
    secret = os.urandom(32)
    _nonce, hello = auth.hello()
    python = _other_users_python()
    client = textwrap.dedent(f"""
        import socket, struct
        s = socket.socket(socket.AF_UNIX)
        s.connect({path!r})
        s.settimeout(10)
        try:
            s.sendall(struct.pack("!IBQ", {len(hello)}, 1, 0) + {hello!r})
            print(len(s.recv(4096)))
        except OSError:     # closed on us
            print(0)
    """)

    async def go() -> str:
        server = await listen(_Recorder(), secret, f"unix:{path}")
        os.chmod(path, 0o666)
        proc = await asyncio.create_subprocess_exec(
            python, "-c", client, user=OTHER_UID, stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        server.close()
        return out.decode().strip()

    assert asyncio.run(go()) == "0"         # closed without the server's AUTH reply


@as_root
def test_a_caller_refuses_a_server_running_as_another_user(shared_dir):
    path = str(shared_dir / "s.sock")
    server = textwrap.dedent(f"""
        import os, socket
        s = socket.socket(socket.AF_UNIX)
        s.bind({path!r}); os.chmod({path!r}, 0o666); s.listen(1)
        print("ready", flush=True)
        conn, _ = s.accept()
        conn.recv(4096)
    """)
    proc = subprocess.Popen([_other_users_python(), "-c", server], stdout=subprocess.PIPE,
                            text=True, user=OTHER_UID)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with pytest.raises(ConnectionError, match=f"runs as uid {OTHER_UID}"):
            asyncio.run(connect(f"unix:{path}", os.urandom(32)))
    finally:
        proc.kill()
        proc.wait(10)


def test_socket_family_check_ignores_tcp():
    with socket.socket() as s:
        class T:
            def get_extra_info(self, name: str) -> Any:
                return s
        assert auth.foreign_peer(T()) is None


@pytest.fixture(autouse=True)
def _no_instance() -> Iterator[None]:
    yield
    fleet.shutdown()
