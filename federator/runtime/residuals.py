"""Error-feedback residuals of clients, kept where the next worker that trains the client finds them.

A residual is what compression left out of a client's update; it belongs to the client, not to a worker
process, and is as large as the model. With a folder (`FEDERATOR_RESIDUAL_DIR`; `federator run` gives
all its workers one, next to the server's state), each residual is one .npy file written atomically
after the server accepted the update it came from: a restarted worker, or another worker of the same
machine that gets the client's next task, continues it, and a server restart does not touch it. Without
a folder (or in a cluster without shared storage) residuals live in the worker's memory, and a client
whose residual is not found starts again from zero: error feedback restarts, nothing breaks.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

log = logging.getLogger("federator.client")


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
            except (OSError, ValueError) as exc:
                log.warning("residual %s unreadable (%s): starting from zero", path, exc)
                found = None
        if found is None or found.shape != (n,) or found.dtype != np.float32:
            return np.zeros(n, dtype=np.float32)
        return found

    def put(self, client_id: str, residual: np.ndarray) -> None:
        if self.directory is None:
            self._memory[client_id] = residual
            return
        path = self._path(client_id)
        tmp = path.with_suffix(".tmp.npy")
        with open(tmp, "wb") as f:
            np.save(f, residual.astype(np.float32, copy=False), allow_pickle=False)
        os.replace(tmp, path)
