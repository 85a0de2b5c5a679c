"""fleet's private runtime directory: where an instance records how to reach it.

``$XDG_RUNTIME_DIR/fleet`` when that variable names a directory, else
``<tmp>/fleet-<uid>``. fleet creates it with mode 0700 and checks it on every use: it
must be a real directory (not a symbolic link), owned by this user, with no group or
other permissions. Otherwise another local user could have made it first, to read an
instance's secret or to point ``fleet status`` at a server of theirs, so fleet refuses.
Files in it are written with ``O_EXCL | O_NOFOLLOW`` under a temporary name and renamed
into place, one file per instance (``instance-<pid>.json``).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import tempfile
from typing import Any

from fleet.exceptions import FleetError, UnsafeRuntimeDirError

_PREFIX, _SUFFIX = "instance-", ".json"


def runtime_dir() -> str:
    """The checked private directory (created if missing); raises UnsafeRuntimeDirError."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if base and os.path.isdir(base):
        path = os.path.join(base, "fleet")
    else:
        path = os.path.join(tempfile.gettempdir(), f"fleet-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private(path)
    return path


def check_private(path: str) -> None:
    """Refuse a directory that is a symlink, not this user's, or open to others."""
    st = os.lstat(path)
    problem = ""
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != os.getuid():
        problem = f"is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    elif st.st_mode & 0o077:
        problem = (f"has mode {stat.S_IMODE(st.st_mode):04o}: group or others may use it "
                   "(it must be 0700)")
    if problem:
        raise UnsafeRuntimeDirError(
            f"fleet's runtime directory {path} {problem}, so fleet will not keep an "
            "instance's secret there or trust what it finds there. Remove it if it is "
            "yours (fleet makes a new one), or set XDG_RUNTIME_DIR to a private directory")


def write_private(directory: str, name: str, data: bytes) -> str:
    """Write name in directory atomically: a new temporary file (O_EXCL, O_NOFOLLOW,
    0600) renamed into place. Returns the path."""
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        path = os.path.join(directory, name)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def instance_path(pid: int | None = None) -> str:
    """This process's (or pid's) instance file."""
    return os.path.join(runtime_dir(), f"{_PREFIX}{pid or os.getpid()}{_SUFFIX}")


def write_instance(info: dict[str, Any]) -> str:
    """Record this process's instance; returns the file's path."""
    return write_private(runtime_dir(), f"{_PREFIX}{os.getpid()}{_SUFFIX}",
                         json.dumps(info).encode())


def remove_instance() -> None:
    """Remove this process's instance file, if any."""
    try:
        os.unlink(instance_path())
    except (OSError, FleetError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False            # another user's process: not an instance of ours
    return True


def read_private(path: str) -> bytes | None:
    """A file's bytes when it is a regular file of this user's, not open to others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None
        return f.read(1 << 16)


def live_instances() -> list[tuple[str, dict[str, Any]]]:
    """(path, info) of every running instance of this user, newest first; files of
    instances whose process is gone are removed."""
    directory = runtime_dir()
    found: list[tuple[float, str, dict[str, Any]]] = []
    for name in os.listdir(directory):
        if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
            continue
        path = os.path.join(directory, name)
        raw = read_private(path)
        try:
            info = json.loads(raw) if raw is not None else None
            pid = int(info["pid"]) if isinstance(info, dict) else 0
        except (ValueError, KeyError, TypeError):
            info, pid = None, 0
        if info is None or not _alive(pid):
            try:
                os.unlink(path)
            except OSError:
                pass
            continue
        found.append((float(info.get("started", 0)), path, info))
    found.sort(key=lambda entry: entry[0], reverse=True)
    return [(path, info) for _, path, info in found]
