"""A custom `module:factory` model for tests: a tiny classifier carrying a large unused weight.

It makes a model of any size cheap to train, so the transport of >100 MB updates can be tested quickly.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Ballast(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, megabytes: float) -> None:
        super().__init__()
        self.head = nn.Linear(math.prod(input_shape), num_classes)
        self.ballast = nn.Parameter(torch.zeros(int(megabytes * (1 << 20)) // 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1)) + 0.0 * self.ballast[0]


def ballast(input_shape: tuple[int, ...], num_classes: int, megabytes: float = 1.0) -> nn.Module:
    return Ballast(input_shape, num_classes, megabytes)
