"""Atomic checkpoints of the server's state, loaded without unpickling arbitrary objects.

A checkpoint holds only tensors, dicts, lists, tuples, ints, floats, bools, strings and None, so
``torch.load(weights_only=True)`` can read it back.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

_SCALARS = (bool, int, float, str, type(None))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back."""


def _check_state(obj: Any, where: str) -> None:
    if isinstance(obj, (torch.Tensor, *_SCALARS)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise CheckpointError(f"checkpoint {where}: key {k!r} must be a string or int")
            _check_state(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_state(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"checkpoint {where}: {type(obj).__name__} cannot be loaded with weights_only=True; "
        "store tensors, dicts, lists, numbers, strings or None (e.g. torch.from_numpy for arrays)"
    )


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; not possible on every platform, and harmless to skip there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves either the old file or the new one."""
    path = Path(path)
    _check_state(state, "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed explicitly before the rename
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with tmp:
            torch.save(state, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The state saved at ``path``, or None if there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); delete it to start "
            "afresh or restore it from a backup"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a dict; delete it or restore a backup"
        )
    return state
