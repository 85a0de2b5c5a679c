"""Every process the local backend starts dies with its parent, whatever it is doing.

Two mechanisms, because either alone has a gap:

- Linux's ``PR_SET_PDEATHSIG`` (set through ``prctl`` in the child, first thing): the
  kernel sends SIGKILL when the parent dies, even to a child stuck in C code or one
  that ignores SIGTERM. The child checks its parent is still the one that started it
  right after, closing the race with a parent that died before.
- A pipe whose write end only the parent holds: a daemon thread in the child blocks on
  the read end and SIGKILLs its own process at end of file. This covers systems
  without prctl, and a parent that is gone while its spawning thread is not.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
ARG = "--lifeline"


class Lifeline:
    """The parent's side: one pipe for all its children."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()     # both non-inheritable (PEP 446)

    def child_args(self) -> list[str]:
        """Arguments to start a child with (its read end must be in pass_fds)."""
        return [ARG, f"{self.read_fd}:{os.getpid()}"]

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def hold(argv: list[str]) -> None:
    """The child's side, from its command line: die with the parent."""
    if ARG not in argv:
        return
    fd_text, _, ppid_text = argv[argv.index(ARG) + 1].partition(":")
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != int(ppid_text):
        os._exit(1)                 # the parent died before prctl took effect
    fd = int(fd_text)

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="fleet-lifeline", daemon=True).start()
