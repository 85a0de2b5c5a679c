"""Whether a stop signal reached this process, readable from any thread at once.

Python runs a signal's handler on the main thread, once that thread holds the GIL; the
C-level handler runs at delivery, on whichever thread the kernel chose, and writes the
signal's number to the wakeup fd. A signal to a whole process group reaches the
replicas too, and the controller's thread can see one of them exit before the main
thread has run the handler: it asks :func:`stop_signalled`, which reads that fd and the
signals still pending for the process, before it replaces the replica.
"""

from __future__ import annotations

import os
import signal

_STOP = (signal.SIGTERM, signal.SIGINT)
_read_fd: int | None = None
_seen = False


def watch() -> None:
    """Have the stop signals' arrival written to a pipe (main thread only; a process
    whose wakeup fd is already in use, by an asyncio loop say, keeps it and relies on the
    Python handler alone)."""
    global _read_fd
    if _read_fd is not None:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    try:
        old = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:          # not the main thread
        os.close(read_fd)
        os.close(write_fd)
        return
    if old != -1:
        signal.set_wakeup_fd(old)
        os.close(read_fd)
        os.close(write_fd)
        return
    _read_fd = read_fd


def stop_signalled() -> bool:
    """True once SIGTERM or SIGINT has reached this process (after :func:`watch`): its
    C-level handler wrote it to the pipe, or it is still pending, the thread the kernel
    chose for it not having run yet."""
    global _seen
    if _seen or _read_fd is None:
        return _seen
    try:
        data = os.read(_read_fd, 512)
    except (BlockingIOError, OSError):
        data = b""
    _seen = any(b in _STOP for b in data) or any(s in _STOP for s in signal.sigpending())
    return _seen
