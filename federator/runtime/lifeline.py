"""Processes started by `federator run` end with it, however it ends (kill -9 included).

The parent keeps the write end of a pipe and passes the read end to each child (`FEDERATOR_LIFELINE_FD`).
The kernel closes the write end when the parent dies, so the child's read returns: the child then stops
itself as on SIGTERM. On Linux the child also asks for SIGTERM when its parent dies (PR_SET_PDEATHSIG),
which is immediate; the pipe is the portable path, and covers a parent that dies before prctl is called.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import stat
import sys
import threading

ENV_FD = "FEDERATOR_LIFELINE_FD"
ENV_PARENT = "FEDERATOR_PARENT_PID"
PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 10.0  # after the parent died: time to stop cleanly before the child exits regardless


def watch_parent() -> bool:
    """In a child: stop (SIGTERM to ourselves) when the parent that set the environment dies.

    Returns False, and watches nothing, when this process holds no lifeline: no variable, or a variable
    without its pipe (inherited by a process that did not get the fd).
    """
    fd_text = os.environ.get(ENV_FD, "")
    if not fd_text.isdigit():
        return False
    fd = int(fd_text)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
    except OSError:
        return False
    if sys.platform.startswith("linux") and os.getppid() == int(os.environ.get(ENV_PARENT, "0") or 0):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # a parent that died before prctl leaves the pipe at EOF already: the watcher stops us at once
    threading.Thread(target=_watch, args=(fd,), name="lifeline", daemon=True).start()
    return True


def _watch(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 1):
            pass
    _parent_gone()


def _parent_gone() -> None:
    timer = threading.Timer(GRACE_SECONDS, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
    os.kill(os.getpid(), signal.SIGTERM)


def child_env_and_fds() -> tuple[dict[str, str], int, int]:
    """In the parent: (environment for the children, read fd to pass them, write fd to keep open)."""
    read_fd, write_fd = os.pipe()  # both non-inheritable; pass_fds makes only the read end reach a child
    return {ENV_FD: str(read_fd), ENV_PARENT: str(os.getpid())}, read_fd, write_fd
