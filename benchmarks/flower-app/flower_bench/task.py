"""Model, data and training loop shared by the ServerApp and the ClientApp.

The task mirrors `examples/quickstart.yaml`: scikit-learn's bundled digits scaled to [0, 1], an 80/20
stratified split with the seed, the training part split IID over the clients, an MLP with ReLU, SGD.
The benchmark passes the data as a file exported from Federator's own partitioning, so both frameworks
train on identical partitions, and the ClientApp (one fresh process per round) does not import
scikit-learn.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

NUM_FEATURES = 64
NUM_CLASSES = 10


def parse_hidden(hidden_sizes: str) -> list[int]:
    """`"2048,2048"` -> `[2048, 2048]` (the run config holds scalars only)."""
    return [int(h) for h in str(hidden_sizes).replace(" ", "").split(",") if h]


def make_model(hidden: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = NUM_FEATURES
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers)


@functools.lru_cache(maxsize=1)
def _split(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Federator's split, recomputed: used only when no exported data file is given."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    n_test = round(len(y) * test_fraction)  # an absolute count, as Federator's split uses
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=n_test, stratify=y, random_state=seed)
    return x_tr, x_te, y_tr, y_te


def _from_file(data_file: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(data_file) as archive:  # reads only the two arrays asked for
        x = archive[f"x_{key}"].reshape(len(archive[f"y_{key}"]), -1).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(archive[f"y_{key}"].astype(np.int64))


def load_partition(
    partition_id: int, num_partitions: int, test_fraction: float, seed: int, data_file: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's IID share of the training set.

    From ``data_file`` (arrays ``x_<id>``/``y_<id>``, written by the benchmark from Federator's own
    partitioning) when given; otherwise recomputed: a seeded permutation cut into equal parts.
    """
    if data_file:
        return _from_file(data_file, str(partition_id))
    x_tr, _, y_tr, _ = _split(test_fraction, seed)
    order = np.random.default_rng(seed).permutation(len(y_tr))
    part = np.sort(np.array_split(order, num_partitions)[partition_id])
    return torch.from_numpy(x_tr[part]), torch.from_numpy(y_tr[part])


def load_test(test_fraction: float, seed: int, data_file: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    if data_file:
        return _from_file(data_file, "test")
    _, x_te, _, y_te = _split(test_fraction, seed)
    return torch.from_numpy(x_te), torch.from_numpy(y_te)


def warm_up() -> None:
    """One tiny SGD step: torch's first backward/step in a process costs seconds of one-off setup.

    A ClientApp process lives for one message, so without this every timed `fit` would include it.
    """
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(torch.zeros(1, 2)), torch.zeros(1, dtype=torch.int64)).backward()
    optimizer.step()


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    seed: int,
) -> tuple[float, float]:
    """SGD; returns (mean training loss over the last epoch, seconds spent training)."""
    start = time.perf_counter()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    epoch_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        epoch_loss = total / len(y)
    return epoch_loss, time.perf_counter() - start


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) on the given set."""
    model.eval()
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    accuracy = float((logits.argmax(dim=1) == y).float().mean())
    return loss, accuracy


def process_start_time() -> float:
    """Wall-clock time at which this process was started (Linux, 10 ms resolution; `nan` elsewhere)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return float("nan")


def as_float(value: object) -> float:
    """A record value that must be one number (records may also hold lists and bytes)."""
    if isinstance(value, bytes) or not isinstance(value, int | float | str):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)
