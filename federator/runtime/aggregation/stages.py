"""Per-update stages: pure functions on a block of update rows ((k, d) float32 differences to the global
model), applied to each update as it arrives (streaming) or to the whole round at once (buffered).

Norm clipping now; decompression and DP clipping plug in here later. A stage never modifies its input.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from federator.api.models import AggregationSpec
from federator.runtime import robust

UpdateStage = Callable[[torch.Tensor], torch.Tensor]


def update_stages(agg: AggregationSpec) -> list[UpdateStage]:
    """The per-update stages the spec asks for, in the order they run."""
    stages: list[UpdateStage] = []
    if agg.normClip is not None:
        stages.append(partial(robust.norm_clip, max_norm=agg.normClip.maxNorm))
    return stages


def apply_stages(stages: list[UpdateStage], rows: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        rows = stage(rows)
    return rows
