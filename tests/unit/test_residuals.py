"""Residual files: a writer killed mid-write never leaves a torn residual behind, unreadable files start from
zero, temporaries of killed writers are swept, and two stores on one folder share the client's residual."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from federator.runtime.residuals import STALE_SECONDS, ResidualStore, _sweep_stale
from tests.helpers.waiting import wait_for

N = 2_000_000  # 8 MB a write: long enough that a kill often lands inside one

WRITER = """
import sys
from pathlib import Path
import numpy as np
from federator.runtime.residuals import ResidualStore
store = ResidualStore(Path(sys.argv[1]), "fed")
i = 0
while True:
    i += 1
    store.put("sim-0", np.full(int(sys.argv[2]), float(i), dtype=np.float32))
"""


def test_a_writer_killed_mid_write_leaves_a_whole_residual(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites one client's residual in a loop, at several moments: the file is
    always one whole version (every value the same), never a mix or a short array."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    path = tmp_path / "fed--sim-0.npy"
    for delay in (0.0, 0.03, 0.11, 0.29):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(N)], env=env)
        try:
            before = os.stat(path).st_mtime_ns if path.exists() else 0
            wait_for(lambda before=before: path.exists() and os.stat(path).st_mtime_ns != before, 120,
                     "a residual write")
            time.sleep(delay)
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(30)
        got = ResidualStore(tmp_path, "fed").get("sim-0", N)
        assert got.shape == (N,) and got[0] >= 1.0, "the last complete write must be found"
        assert np.all(got == got[0]), "a torn residual"
    assert list(tmp_path.glob("*.npy")) == [path]  # temporaries are hidden (.name.XXXX.tmp), not residuals


def test_unreadable_or_foreign_residuals_start_from_zero(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path, "fed")
    path = store._path("sim-1")
    for content in (b"", b"\x93NUMPY garbage", np.arange(3, dtype=np.float32).tobytes()):
        path.write_bytes(content)
        assert not store.get("sim-1", 5).any()
    np.save(path, np.ones(4, dtype=np.float32))  # another model's size
    assert not store.get("sim-1", 5).any()
    np.save(path, np.ones(5, dtype=np.float64))  # another dtype
    assert not store.get("sim-1", 5).any()


def test_two_stores_on_one_folder_continue_each_others_residuals(tmp_path: Path) -> None:
    """Two workers on one ReadWriteMany claim: whichever trains the client next finds its residual."""
    a, b = ResidualStore(tmp_path, "fed"), ResidualStore(tmp_path, "fed")
    a.put("sim-3", np.full(7, 2.5, dtype=np.float32))
    np.testing.assert_array_equal(b.get("sim-3", 7), np.full(7, 2.5, dtype=np.float32))
    b.put("sim-3", np.full(7, -1.0, dtype=np.float32))
    np.testing.assert_array_equal(a.get("sim-3", 7), np.full(7, -1.0, dtype=np.float32))
    assert not ResidualStore(tmp_path, "other").get("sim-3", 7).any()  # another federation's clients


def test_temporaries_left_by_killed_writers_are_swept_once_old(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path, "fed")
    path = store._path("sim-0")
    old = tmp_path / f".{path.name}.abc123.tmp"
    young = tmp_path / f".{path.name}.def456.tmp"  # another writer's, right now
    other = tmp_path / f".{store._path('sim-1').name}.x.tmp"
    for t in (old, young, other):
        t.write_bytes(b"partial")
    past = time.time() - STALE_SECONDS - 5
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    store.put("sim-0", np.zeros(3, dtype=np.float32))
    assert not old.exists() and young.exists()
    assert other.exists()  # swept by its own client's next write
    _sweep_stale(store._path("sim-1"))
    assert not other.exists()


def test_a_staged_residual_counts_only_once_committed(tmp_path: Path) -> None:
    """A worker stages before it uploads; a rejected (or broken-off) upload's residual never becomes the client's."""
    for directory in (tmp_path, None):
        store = ResidualStore(directory, "fed")
        store.put("sim-0", np.full(4, 1.0, dtype=np.float32))
        staged = store.stage("sim-0", np.full(4, 2.0, dtype=np.float32))
        np.testing.assert_array_equal(store.get("sim-0", 4), np.full(4, 1.0, dtype=np.float32))
        staged.discard()
        np.testing.assert_array_equal(store.get("sim-0", 4), np.full(4, 1.0, dtype=np.float32))
        store.stage("sim-0", np.full(4, 3.0, dtype=np.float32)).commit()
        np.testing.assert_array_equal(store.get("sim-0", 4), np.full(4, 3.0, dtype=np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["fed--sim-0.npy"]  # no temporaries left
