"""One server per state folder: the lock refuses a second holder, names the first, and dies with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from federator.runtime.statelock import StateDirLocked, ensure_unlocked, lock_state_dir


def test_a_second_lock_is_refused_naming_the_holder_and_the_fix(tmp_path: Path) -> None:
    fd = lock_state_dir(tmp_path)
    try:
        with pytest.raises(StateDirLocked) as err:
            lock_state_dir(tmp_path)
        assert err.value.pid == os.getpid()
        assert f"in use by process {os.getpid()}" in str(err.value) and f"kill {os.getpid()}" in str(err.value)
        assert "--state-dir / --out" in str(err.value)
        with pytest.raises(StateDirLocked):
            ensure_unlocked(tmp_path)
    finally:
        os.close(fd)
    ensure_unlocked(tmp_path)  # released: nothing raised, and a new holder may take it
    os.close(lock_state_dir(tmp_path))


def test_the_lock_goes_with_its_process_however_it_ends(tmp_path: Path) -> None:
    code = (f"import os, sys; from pathlib import Path; from federator.runtime.statelock import lock_state_dir; "
            f"lock_state_dir(Path({str(tmp_path)!r})); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(StateDirLocked, match=f"process {holder.pid}"):
            ensure_unlocked(tmp_path)
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait(30)
    finally:
        holder.kill()
        holder.wait(30)
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()  # (warnings are errors: an unclosed pipe fails the test)
    ensure_unlocked(tmp_path)  # the kernel released it; the stale pid file does not matter
