"""Run directories: one owner at a time (an advisory lock), fresh directories for new
runs, and the check that a resumed run is the run its checkpoint came from.

Lock: ``<run_dir>/.lock`` holds ``host pid start-time`` of the process (global rank 0)
that owns the directory, under ``fcntl.flock``. The kernel drops the flock when that
process dies however it dies, so a lock file nobody holds is stale: it is taken over and
the log says whose it was. On a network filesystem without working flock the lock may
not exclude a process on another host; the start-up line names the holder either way.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional, Tuple

from .config import UsageError

LOCK_NAME = ".lock"


class RunDirLock:
    """Held for the lifetime of a run (global rank 0 only)."""

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: Optional[int] = None
        self.stale: Optional[str] = None

    def acquire(self) -> "RunDirLock":
        """Take the lock or raise one UsageError naming the holder. Sets ``stale`` to the
        previous holder's line when a lock file nobody held was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd) or "another process (no holder recorded yet)"
            os.close(fd)
            raise UsageError("run_dir", str(self.path.parent),
                             f"in use by {holder}; wait for that run to end (or stop it), or choose another run_dir")
        previous = _read(fd)
        if previous:
            self.stale = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def holder_of(run_dir: str) -> Tuple[bool, str]:
    """(locked now, recorded holder) of a run directory, for tests and messages."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return False, ""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True, _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, _read(fd)
    finally:
        os.close(fd)


__all__ = ["LOCK_NAME", "RunDirLock", "holder_of"]
