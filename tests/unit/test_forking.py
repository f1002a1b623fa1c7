"""A forked child of `federator run` starts as `subprocess.Popen(start_new_session=True, pass_fds=...)` would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from federator import forking
from tests.helpers.manifests import manifest, write_manifest


@pytest.fixture
def log(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "child.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    yield path, fd
    os.close(fd)


def _report() -> int:
    """What the child sees of itself, as JSON on stdout (its log)."""
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    print(json.dumps({
        "pid": os.getpid(), "sid": os.getsid(0), "env": dict(os.environ), "argv": sys.argv[1:],
        "fds": fds, "comm": Path("/proc/self/comm").read_text().strip(),
        "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "sigint_raises": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    }))
    return 3


def test_the_child_has_its_own_session_environment_fds_and_handlers(log: tuple[Path, int]) -> None:
    path, fd = log
    keep_r, keep_w = os.pipe()
    stray = os.open(os.devnull, os.O_RDONLY)  # inherited by a fork unless closed
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # the parent's handler must not be the child's
    try:
        child = forking.fork_call(_report, ["server", "--port", "1"], fd, {"ONLY": "this"}, keep_fds=(keep_r,),
                                  name="fed-server")
        assert child.wait(60) == 3 and child.returncode == 3 and child.poll() == 3
    finally:
        signal.signal(signal.SIGTERM, previous)
        for f in (keep_r, keep_w, stray):
            os.close(f)
    seen = json.loads(path.read_text())
    assert seen["pid"] == child.pid and seen["sid"] == child.pid  # a session of its own, as start_new_session
    assert seen["env"] == {"ONLY": "this"}
    assert seen["argv"] == ["server", "--port", "1"]
    # only stdin, stdout, stderr and the passed fd (listdir itself holds one more while it reads the folder)
    assert {0, 1, 2, keep_r} <= set(seen["fds"]) and keep_w not in seen["fds"] and stray not in seen["fds"]
    assert len(seen["fds"]) <= 5
    assert seen["comm"] == "fed-server"
    assert seen["sigterm_default"] and seen["sigint_raises"]


def _sleep() -> int:
    time.sleep(120)
    return 0


def test_wait_times_out_and_a_signal_shows_as_a_negative_code(log: tuple[Path, int]) -> None:
    _, fd = log
    child = forking.fork_call(_sleep, ["client"], fd, {})
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(0.2)
        assert child.poll() is None
    finally:
        child.send_signal(signal.SIGTERM)
    assert child.wait(60) == -signal.SIGTERM
    child.send_signal(signal.SIGTERM)  # a finished child: nothing to signal, no error


def _fail() -> int:
    raise RuntimeError("boom in the child")


def _exit_4() -> int:
    raise SystemExit(4)


def test_an_exception_in_the_child_is_logged_and_never_returns_into_the_parent(log: tuple[Path, int]) -> None:
    path, fd = log
    assert forking.fork_call(_fail, ["server"], fd, {}).wait(60) == 1
    assert "RuntimeError: boom in the child" in path.read_text()
    assert forking.fork_call(_exit_4, ["server"], fd, {}).wait(60) == 4


def test_no_fork_while_another_thread_runs() -> None:
    assert forking.can_fork() == (threading.active_count() == 1)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert not forking.can_fork()
    finally:
        stop.set()
        other.join()


def test_the_forks_find_the_data_the_run_loaded_before_forking(tmp_path: Path, log: tuple[Path, int]) -> None:
    """`federator run` loads and splits the data once; a fork reading the manifest as the server and the
    workers do (federator.runtime.config) gets that copy, and loads nothing itself."""
    from federator.api.manifest import load_federation
    from federator.local import LocalRun
    from federator.runtime.config import load_federation_config
    from federator.runtime.data import _prepare_cached, prepare_data

    path = write_manifest(tmp_path / "fed.yaml", manifest(data={"dataset": "synthetic", "seed": 11}))
    LocalRun(manifest=path, fed=load_federation(path), out=tmp_path, workers=1, fork=True).preload()

    def child() -> int:
        before = _prepare_cached.cache_info()
        prepare_data(load_federation_config(path).spec)
        after = _prepare_cached.cache_info()
        print(after.misses - before.misses, after.hits - before.hits)
        return 0

    log_path, fd = log
    assert forking.fork_call(child, ["client"], fd, {}).wait(60) == 0
    assert log_path.read_text().split() == ["0", "1"]  # no miss: nothing loaded again


def test_a_data_error_before_forking_is_left_to_the_server(tmp_path: Path) -> None:
    from federator.api.manifest import load_federation
    from federator.local import LocalRun
    from federator.runtime.data import DataError, prepare_data

    path = write_manifest(tmp_path / "fed.yaml", manifest(data={"dataset": "npz", "path": str(tmp_path / "gone.npz")}))
    fed = load_federation(path)
    LocalRun(manifest=path, fed=fed, out=tmp_path, workers=1, fork=True).preload()  # no raise here...
    with pytest.raises(DataError, match=r"gone\.npz"):  # ...the server meets it when it loads the data
        prepare_data(fed.spec)
