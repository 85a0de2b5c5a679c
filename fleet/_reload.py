"""``fleet run --reload``: notice that an application's source files changed and import
them afresh, so that a redeploy rolls only the deployments whose code or options changed.

The files watched are those of the modules imported from the application's directories
(and the config file), found again after each reload, so the set is as small as the
application and never a scan of a whole tree. Polling their modification times costs a
few stat calls every half second and needs no extra package.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root + os.sep) for root in roots)


def _is_library(path: str) -> bool:
    parts = path.split(os.sep)
    return "site-packages" in parts or "dist-packages" in parts or ".venv" in parts


class Watcher:
    """The modification times of the application's own source files."""

    def __init__(self, roots: Iterable[str], extra_files: Iterable[str] = ()) -> None:
        self.roots = [os.path.realpath(r) for r in roots]
        self.extra = [os.path.realpath(f) for f in extra_files]
        self.mtimes: dict[str, float] = {}
        self.rescan()

    def files(self) -> list[str]:
        """Source files of modules imported from the roots, and the extra files."""
        found = set(self.extra)
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if not path or not path.endswith(".py"):
                continue
            path = os.path.realpath(path)
            if _under(path, self.roots) and not _is_library(path):
                found.add(path)
        return sorted(found)

    def rescan(self) -> None:
        """Take the current files and times as the new baseline. Files watched before
        stay watched: a module that failed to import is not in sys.modules, and its fix
        must still be noticed."""
        paths = set(self.files()) | set(self.mtimes)
        self.mtimes = {path: _mtime(path) for path in sorted(paths)}

    def changed(self) -> list[str]:
        """Files whose modification time differs from the baseline (or that vanished)."""
        return [path for path, seen in self.mtimes.items() if _mtime(path) != seen]

    def forget_modules(self) -> list[str]:
        """Drop the roots' modules from sys.modules so the next import reads the files
        again; returns their names. fleet itself is never dropped."""
        gone = []
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            if not path or name == "fleet" or name.startswith("fleet."):
                continue
            path = os.path.realpath(path)
            if _under(path, self.roots) and not _is_library(path):
                del sys.modules[name]
                gone.append(name)
        return gone


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return -1.0
