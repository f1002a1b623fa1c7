from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from federator.runtime import checkpoint
from federator.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _state(round_: int) -> dict[str, Any]:
    return {
        "round": round_,
        "params": {"w": torch.full((3, 4), float(round_)), "n": torch.tensor(round_)},
        "history": [{"round": r, "accuracy": 0.5 + r / 100, "note": None} for r in range(round_)],
        "name": "fed",
        "shape": (3, 4),
        "ok": True,
    }


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(path, _state(3))
    loaded = load_checkpoint(path)
    assert loaded is not None
    assert loaded["round"] == 3 and loaded["name"] == "fed" and loaded["ok"] is True
    assert torch.equal(loaded["params"]["w"], torch.full((3, 4), 3.0))
    assert loaded["history"][2] == {"round": 2, "accuracy": 0.52, "note": None}
    assert _files(path.parent) == ["ckpt.pt"]


def test_missing_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "nothing.pt") is None


def test_overwrite_replaces(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    loaded = load_checkpoint(path)
    assert loaded is not None and loaded["round"] == 2
    assert _files(tmp_path) == ["ckpt.pt"]


def test_crash_mid_write_keeps_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state(1))
    old_bytes = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2))
    assert path.read_bytes() == old_bytes
    assert _files(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    loaded = load_checkpoint(path)
    assert loaded is not None and loaded["round"] == 1


def test_crash_before_first_checkpoint_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError("I/O error")

    monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        save_checkpoint(tmp_path / "ckpt.pt", _state(1))
    assert _files(tmp_path) == []


def test_truncated_or_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state(5))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt\.pt is corrupt.*delete it.*backup"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    path.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


class Thing:
    """Any class: picklable, but not loadable with weights_only=True."""


def test_arbitrary_objects_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"state\['extra'\]\[0\]: Thing"):
        save_checkpoint(tmp_path / "a.pt", {"extra": [Thing()]})
    with pytest.raises(CheckpointError, match=r"ndarray.*torch\.from_numpy"):
        save_checkpoint(tmp_path / "a.pt", {"x": np.zeros(2)})
    assert _files(tmp_path) == []
    # a file written by plain torch.save with a custom object is not unpickled on load
    torch.save({"thing": Thing()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(tmp_path / "list.pt")
