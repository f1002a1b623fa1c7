"""Local training and evaluation on in-memory arrays, and parameter get/set."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from federator.api.models import TrainingSpec
from federator.runtime.data import ArrayDataset
from federator.runtime.optim import SGD, Adam, LocalOptimizer

Params = dict[str, torch.Tensor]


@dataclass
class TrainResult:
    num_samples: int
    loss: float
    seconds: float


def get_params(model: nn.Module) -> Params:
    """A detached, contiguous CPU copy of the model's state dict (parameters and buffers)."""
    return {
        k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for k, v in model.state_dict().items()
    }


def set_params(model: nn.Module, params: Params) -> None:
    """Copy ``params`` into the model (strict: every key must match); ``params`` is not aliased."""
    model.load_state_dict(params, strict=True)


def _tensors(data: ArrayDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    def conv(a: np.ndarray) -> torch.Tensor:
        # from_numpy shares memory (no copy) but warns on read-only arrays; copy those instead.
        t = torch.from_numpy(a) if a.flags.writeable else torch.tensor(a)
        return t.to(device)

    return conv(np.ascontiguousarray(data.x)), conv(np.ascontiguousarray(data.y))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def make_optimizer(training: TrainingSpec, params: Sequence[torch.Tensor]) -> LocalOptimizer:
    """``training.optimizer`` over ``params`` (torch's update functions; see federator.runtime.optim)."""
    if training.optimizer == "sgd":
        return SGD(params, lr=training.learningRate, momentum=training.momentum, weight_decay=training.weightDecay)
    return Adam(params, lr=training.learningRate, weight_decay=training.weightDecay)


def warm_up(training: TrainingSpec) -> None:
    """One step of a tiny model through the training path (forward, loss, backward, ``training``'s
    optimizer), so that torch's lazy one-off set-up is paid before a worker joins, not in round 1."""
    with torch.random.fork_rng(devices=[]):
        model = nn.Linear(2, 2)
        opt = make_optimizer(training, list(model.parameters()))
        F.cross_entropy(model(torch.zeros(1, 2)), torch.zeros(1, dtype=torch.long)).backward()
        opt.step()
        opt.zero_grad()


def train_local(
    model: nn.Module,
    data: ArrayDataset,
    training: TrainingSpec,
    seed: int,
    global_params: Params | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``training.localEpochs``.

    With ``training.proximalMu > 0`` this is FedProx: the gradient of (mu/2)*||w - w_global||^2 is
    added, where w_global is ``global_params`` or, if not given, the weights at the start. Dropout and
    shuffling are seeded by ``seed``; the global torch RNG is left untouched. ``loss`` is the mean
    cross-entropy (without the proximal term) over the last epoch.
    """
    n = len(data)
    if n == 0:
        raise ValueError("train_local: the client has no training samples")
    start = time.perf_counter()
    device = _device(model)
    x, y = _tensors(data, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(training, params)

    mu = training.proximalMu
    anchors: list[tuple[torch.Tensor, torch.Tensor]] = []
    if mu > 0:
        if global_params is None:
            anchors = [(p, p.detach().clone()) for p in params]
        else:
            named = dict(model.named_parameters())
            missing = [k for k, p in named.items() if p.requires_grad and k not in global_params]
            if missing:
                raise ValueError(f"train_local: global_params lacks parameters {missing[:5]}")
            anchors = [
                (p, global_params[k].detach().to(device=p.device, dtype=p.dtype))
                for k, p in named.items()
                if p.requires_grad
            ]

    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    bs = training.batchSize
    epoch_loss = float("nan")
    with torch.random.fork_rng(devices=[]):
        # dropout and any other randomness inside the model; on the CPU only the CPU generator matters,
        # and torch.manual_seed would also queue CUDA seeding (0.3 ms a task, a stack trace each time)
        if device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        for _epoch in range(training.localEpochs):
            perm = torch.randperm(n, generator=generator).to(device)
            total = torch.zeros((), dtype=torch.float64, device=device)
            for i in range(0, n, bs):
                idx = perm[i : i + bs]
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                if anchors:
                    with torch.no_grad():
                        for p, anchor in anchors:
                            prox = (p - anchor).mul_(mu)
                            if p.grad is None:
                                p.grad = prox
                            else:
                                p.grad.add_(prox)
                opt.step()
                total += loss.detach().double() * idx.numel()
            epoch_loss = float(total) / n
    model.train(was_training)
    return TrainResult(num_samples=n, loss=epoch_loss, seconds=time.perf_counter() - start)


def evaluate(model: nn.Module, data: ArrayDataset, batch_size: int = 2048) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``data``; the model's train/eval mode is restored."""
    n = len(data)
    if n == 0:
        raise ValueError("evaluate: the data set is empty")
    device = _device(model)
    x, y = _tensors(data, device)
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = 0
    try:
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                logits = model(x[i : i + batch_size])
                yb = y[i : i + batch_size]
                loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
                correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return loss_sum / n, correct / n
