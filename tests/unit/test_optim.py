"""The local optimizers are torch.optim's SGD and Adam, bit for bit, without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

from federator.runtime.optim import SGD, Adam, LocalOptimizer

torch.set_num_threads(1)

Make = Callable[[list[torch.Tensor]], "torch.optim.Optimizer | LocalOptimizer"]


class TwoPaths(nn.Module):
    """`side` gets a gradient only on even steps, so the optimizers must skip it (and keep its state) on odd ones."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.side = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor, use_side: bool) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out + self.side if use_side else out


def _train(make: Make, steps: int = 12) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = TwoPaths()
    opt = make(list(model.parameters()))
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(5, 6, generator=gen)
        y = torch.randint(0, 3, (5,), generator=gen)
        if isinstance(opt, torch.optim.Optimizer):
            opt.zero_grad(set_to_none=True)
        else:
            opt.zero_grad()
        nn.functional.cross_entropy(model(x, use_side=step % 2 == 0), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


CASES: list[tuple[str, Make, Make]] = [
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1), lambda ps: SGD(ps, lr=0.1)),
    ("sgd momentum", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: SGD(ps, lr=0.1, momentum=0.9)),
    ("sgd momentum weight decay", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, weight_decay=0.01),
     lambda ps: SGD(ps, lr=0.05, momentum=0.5, weight_decay=0.01)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=0.01), lambda ps: Adam(ps, lr=0.01)),
    ("adam weight decay", lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
     lambda ps: Adam(ps, lr=0.01, weight_decay=0.1)),
]


@pytest.mark.parametrize(("name", "theirs", "ours"), CASES, ids=[c[0] for c in CASES])
def test_every_step_is_bit_identical_to_torch_optim(name: str, theirs: Make, ours: Make) -> None:
    want, got = _train(theirs), _train(ours)
    assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True)), name
    fewer = _train(ours, steps=10)
    assert not any(torch.equal(f, g) for f, g in zip(fewer, got, strict=True))  # the last steps moved every weight


def test_a_parameter_without_gradient_is_left_alone() -> None:
    used, unused = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    for opt in (SGD([used, unused], lr=0.5, momentum=0.9), Adam([used, unused], lr=0.5)):
        (used * torch.tensor([1.0, -1.0])).sum().backward()
        opt.step()
        assert torch.equal(unused.detach(), torch.ones(2)) and not torch.equal(used.detach(), torch.ones(2))
        opt.zero_grad()
        assert used.grad is None


WORKER_PATH = """
import sys
import numpy as np
import federator.runtime.client, federator.runtime.server  # everything a worker and a server import
from federator.api.models import ModelSpec, TrainingSpec
from federator.runtime.data import ArrayDataset
from federator.runtime.models import build_model
from federator.runtime.training import evaluate, get_params, set_params, train_local, warm_up

x = np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype(np.float32)
data = ArrayDataset(x, (np.arange(40) % 10).astype(np.int64), 10)
for training in (TrainingSpec(optimizer="sgd", momentum=0.9, weightDecay=0.001, proximalMu=0.1),
                 TrainingSpec(optimizer="adam", learningRate=0.01)):
    warm_up(training)  # what a worker does before it joins
    for name in ("mlp", "cnn"):
        model = build_model(ModelSpec(name=name), (1, 8, 8), 10, seed=0)
        start = get_params(model)
        train_local(model, data, training, seed=0, global_params=start)
        evaluate(model, data)
        set_params(model, start)
print("torch._dynamo" in sys.modules, "torch" in sys.modules)
"""


def test_the_training_path_never_imports_torch_dynamo() -> None:
    """torch.optim's classes import torch._dynamo (about a second of CPU per worker at start-up)."""
    out = subprocess.run([sys.executable, "-c", WORKER_PATH], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["False", "True"], out.stderr[-2000:]


def test_the_check_above_sees_torch_optim_import_torch_dynamo() -> None:
    """The same probe catches the import when torch.optim's classes are used (so the test above can fail)."""
    code = ("import sys, torch; torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).step();"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "True"
