"""The lifeline: a child started with one stops when its parent's end of the pipe closes, and only then."""

from __future__ import annotations

import os
import subprocess
import sys

from federator.runtime import lifeline

CHILD = ("import signal, sys, threading; from federator.runtime import lifeline; stopped = threading.Event();"
         "signal.signal(signal.SIGTERM, lambda *_: stopped.set()); print(lifeline.watch_parent(), flush=True);"
         "print('stopped' if stopped.wait(60) else 'still running', flush=True)")


def test_a_child_stops_when_the_write_end_closes() -> None:
    env, read_fd, write_fd = lifeline.child_env_and_fds()
    child = subprocess.Popen([sys.executable, "-c", CHILD], env={**os.environ, **env}, pass_fds=(read_fd,),
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "True\n"
        os.close(write_fd)  # what the kernel does when the parent dies, kill -9 included
        assert child.stdout.readline() == "stopped\n"
        assert child.wait(30) == 0
    finally:
        os.close(read_fd)
        child.kill()
        child.wait(30)
        if child.stdout is not None:
            child.stdout.close()  # (warnings are errors: an unclosed pipe fails the test)


def test_a_process_without_its_pipe_watches_nothing() -> None:
    env = {**os.environ, lifeline.ENV_FD: "987", lifeline.ENV_PARENT: str(os.getpid())}  # fd 987 is not open
    code = "from federator.runtime import lifeline; print(lifeline.watch_parent())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"
