"""Error-feedback residuals of clients, kept where the next worker that trains the client finds them.

A residual is what compression left out of a client's update; it belongs to the client, not to a worker
process, and is as large as the model. With a folder (`FEDERATOR_RESIDUAL_DIR`; `federator run` gives
all its workers one, next to the server's state; in a cluster the operator mounts a volume for it, see
`children.residual_mount`), each residual is one .npy file written after the server accepted the update it
came from: a restarted worker, or another worker that gets the client's next task and sees the same folder,
continues it, and a server restart does not touch it. Without a folder residuals live in the worker's memory,
and a client whose residual is not found starts again from zero: error feedback restarts, nothing breaks.

A write never leaves a torn file behind, whenever the writer is killed: the array goes to a temporary file of
its own (a unique name, so two writers never share one), is flushed to the disk (fsync) before the update is
submitted (`stage`), and only once the server accepted it renamed over the old file (`commit`: atomic on one
filesystem, NFS included); the folder is synced after the rename.
Temporaries that a killed writer left are removed by the next write of the same client once they are old.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("federator.client")
STALE_SECONDS = 600.0  # a temporary this old was left by a killed writer (a write takes seconds)


class ResidualStore:
    def __init__(self, directory: Path | None, federation: str) -> None:
        self.directory = directory
        self.federation = federation
        self._memory: dict[str, np.ndarray] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: str) -> Path:
        assert self.directory is not None
        return self.directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.federation}--{client_id}") + ".npy")

    def get(self, client_id: str, n: int) -> np.ndarray:
        """The client's residual, or zeros when there is none of this size."""
        if self.directory is None:
            found = self._memory.get(client_id)
        else:
            path = self._path(client_id)
            try:
                found = np.load(path, allow_pickle=False)
            except FileNotFoundError:
                found = None
            except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
                log.warning("residual %s unreadable (%s): starting from zero", path, exc)
                found = None
        if found is None or found.shape != (n,) or found.dtype != np.float32:
            return np.zeros(n, dtype=np.float32)
        return found

    def put(self, client_id: str, residual: np.ndarray) -> None:
        self.stage(client_id, residual).commit()

    def stage(self, client_id: str, residual: np.ndarray) -> Staged:
        """Write the client's next residual aside (flushed to the disk) without making it the residual yet.

        A worker stages before it submits the update and commits once the server accepted it: the commit is
        a rename, done in microseconds, so the worker that trains the client's next task (the server hands it
        out only after this round's aggregation, evaluation and checkpoint) reads the new residual, not the
        one before. Writing the whole file after the reply would leave it a window of a full write."""
        if self.directory is None:
            return Staged(self, client_id, None, residual)
        path = self._path(client_id)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, residual.astype(np.float32, copy=False), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return Staged(self, client_id, Path(tmp), None)


@dataclass
class Staged:
    """A residual written aside: `commit` makes it the client's residual, `discard` drops it."""

    store: ResidualStore
    client_id: str
    tmp: Path | None  # on disk
    residual: np.ndarray | None  # in memory

    def commit(self) -> None:
        if self.tmp is None:
            assert self.residual is not None
            self.store._memory[self.client_id] = self.residual
            return
        path = self.store._path(self.client_id)
        os.replace(self.tmp, path)
        _fsync_directory(path.parent)
        _sweep_stale(path)

    def discard(self) -> None:
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink()


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable; some filesystems cannot sync a folder, and then the rename is
    as durable as they make it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sweep_stale(path: Path, now: float | None = None) -> None:
    """Remove the temporaries of `path`'s client that writers killed mid-write left behind."""
    cutoff = (time.time() if now is None else now) - STALE_SECONDS
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
