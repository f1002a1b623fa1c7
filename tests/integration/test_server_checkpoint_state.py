"""The server keeps its optimizer state through the checkpoint with the tested helpers
(`aggregation.state_to_dict` / `state_from_dict`), so a damaged state is refused with their message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from federator.api.models import Federation
from federator.runtime.aggregation import ServerOptimizerState
from federator.runtime.checkpoint import load_checkpoint, save_checkpoint
from federator.runtime.server import CHECKPOINT_FILE, FederationServer
from tests.helpers.manifests import manifest

FED = Federation.model_validate(manifest(
    rounds=3, aggregation={"serverOptimizer": {"name": "adam"}},
    data={"dataset": "synthetic", "synthetic": {"samples": 200, "features": 8, "classes": 2}}))


def started(state_dir: Path) -> FederationServer:
    return FederationServer(FED, state_dir, ["t"]).start()


def test_the_optimizer_state_survives_a_restart_and_a_damaged_one_is_refused(tmp_path: Path) -> None:
    first = started(tmp_path)
    try:
        name = next(iter(first.params))
        first.opt_state = ServerOptimizerState(step=2, m={name: torch.full_like(first.params[name], 0.5)},
                                               v={name: torch.full_like(first.params[name], 0.25)})
        first._checkpoint(1, [{"round": 1, "accuracy": 0.5, "loss": 1.0}], first.agg_state)
    finally:
        first.stop()
    saved = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert saved is not None and set(saved["optimizer"]) == {"step", "m", "v"}

    second = started(tmp_path)
    try:
        assert second.resumed and second.opt_state.step == 2
        assert torch.equal(second.opt_state.m[name], torch.full_like(second.params[name], 0.5))
        assert torch.equal(second.opt_state.v[name], torch.full_like(second.params[name], 0.25))
        assert second.opt_state.m[name] is not saved["optimizer"]["m"][name]  # a copy, not the loaded tensor
    finally:
        second.stop()

    saved["optimizer"]["m"] = {name: [0.5]}  # a list where a tensor belongs
    save_checkpoint(tmp_path / CHECKPOINT_FILE, saved)
    with pytest.raises(ValueError, match="server optimizer state: m must map names to tensors"):
        FederationServer(FED, tmp_path, ["t"])
