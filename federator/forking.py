"""Start `federator run`'s server and workers as forks of the run process, after it imported torch once.

Each of the three processes used to import torch itself (about 1.4 s of CPU each on 2 cores, which the
processes then competed for). A fork shares the parent's imported modules, so the parent pays once. The
child then does what `subprocess.Popen(start_new_session=True, pass_fds=..., stdout=log, stderr=log,
env=...)` with `python -m federator ARGS` would do: a session of its own, stdout and stderr into its log,
that environment, no file descriptors but the ones passed, default signal handlers, then the command's
`main`, and it leaves with `os._exit`.

Only on Linux (macOS frameworks are not fork-safe) and only from a process with one Python thread (a fork
copies only the calling thread; another one could hold a lock forever in the child): `can_fork()`.
`ForkedChild` has the part of Popen's interface that `federator.local` uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Mapping

PR_SET_NAME = 15  # prctl option: the process name that ps -o comm and top show (15 bytes)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MAX_FD = max(256, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 0)


def can_fork() -> bool:
    """A fork is safe here: Linux, and no Python thread other than this one."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and threading.active_count() == 1


class ForkedChild:
    """A forked child process, waited on like a `subprocess.Popen`."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N when killed by signal N, as Popen
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_call(main: Callable[[], int], args: list[str], log_fd: int, env: Mapping[str, str],
              keep_fds: Collection[int] = (), name: str = "") -> ForkedChild:
    """Run `main()` in a forked child as described above; its return value is the exit code.

    `args` stand for the command (its `sys.argv[1:]` and what errors name); `name` becomes its process
    name (`ps -o comm`). Call only where `can_fork()` holds.
    """
    for stream in (sys.stdout, sys.stderr):  # or the child would write the parent's buffered text too
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    # no signal handler of the parent may run in the child: held until the child has its own handlers
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return ForkedChild(pid, args)
    code = 1
    try:
        _become_child(args, log_fd, env, keep_fds, name)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        code = main()
    except SystemExit as exc:  # argparse and friends
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # the child must never return into the parent's code
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def _become_child(args: list[str], log_fd: int, env: Mapping[str, str], keep_fds: Collection[int],
                  name: str) -> None:
    os.setsid()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    keep = sorted({0, 1, 2, *keep_fds})
    for low, high in zip(keep, [*keep[1:], MAX_FD], strict=True):  # close_fds, as Popen does
        os.closerange(low + 1, high)
    for fd in keep_fds:
        os.set_inheritable(fd, True)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [sys.argv[0], *args]
    # fresh streams on fds 1 and 2 (the parent's may be wrapped or redirected), line-buffered as under
    # PYTHONUNBUFFERED=1
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
