"""One server per state folder: an exclusive OS file lock, which the kernel releases when the process dies.

Two servers on one checkpoint would both complete rounds into it (a round repeated, the history forked).
`flock` is released however the holder ends, kill -9 included, so a stale lock never needs cleaning up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_FILE = "server.lock"


class StateDirLocked(RuntimeError):
    """Another live process holds the state folder."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        holder = f"process {pid}" if pid else "another process"
        super().__init__(
            f"state folder {state_dir} is in use by {holder} (a server of this federation is still running): "
            f"stop it first (kill {pid or '<pid>'}), or use another state folder (--state-dir / --out)"
        )
        self.pid = pid


def lock_state_dir(state_dir: Path) -> int:
    """Take the folder's lock and write our pid into it; returns the file descriptor, to keep open while
    the server lives (closing it, or the process ending, releases the lock)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirLocked(state_dir, holder_pid(state_dir)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def holder_pid(state_dir: Path) -> int | None:
    """The pid written by the lock's holder, if it can be read."""
    with contextlib.suppress(OSError, ValueError):
        return int((state_dir / LOCK_FILE).read_text().strip())
    return None


def ensure_unlocked(state_dir: Path) -> None:
    """Raise StateDirLocked if a live server holds the folder; otherwise leave it as it is."""
    path = state_dir / LOCK_FILE
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StateDirLocked(state_dir, holder_pid(state_dir)) from None
    finally:
        os.close(fd)  # also releases the lock if we got it
