from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from federator.api.models import DataSpec, ModelSpec, TrainingSpec
from federator.runtime.data import ArrayDataset, load_dataset, split_train_test
from federator.runtime.models import build_model
from federator.runtime.training import evaluate, get_params, set_params, train_local

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> tuple[ArrayDataset, ArrayDataset]:
    return split_train_test(load_dataset(DataSpec(dataset="digits")), 0.2, 0)


def _mlp() -> nn.Module:
    return build_model(ModelSpec(name="mlp", hiddenSizes=[64]), (1, 8, 8), 10, seed=0)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5)


def test_get_params_is_a_detached_copy() -> None:
    model = _mlp()
    params = get_params(model)
    assert set(params) == set(model.state_dict())
    for k, t in params.items():
        assert t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad
        assert t.data_ptr() != model.state_dict()[k].data_ptr()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(params["1.weight"], get_params(model)["1.weight"])


def test_set_params_copies_and_is_strict() -> None:
    a, b = _mlp(), build_model(ModelSpec(name="mlp", hiddenSizes=[64]), (1, 8, 8), 10, seed=9)
    pa = get_params(a)
    set_params(b, pa)
    assert all(torch.equal(pa[k], v) for k, v in get_params(b).items())
    with torch.no_grad():
        next(b.parameters()).zero_()
    assert not torch.equal(pa["1.weight"], torch.zeros_like(pa["1.weight"]))  # not aliased
    with pytest.raises(RuntimeError):
        set_params(b, {k: v for k, v in pa.items() if k != "1.bias"})


def test_centralized_mlp_learns_digits(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    train, test = digits
    model = _mlp()
    loss0, acc0 = evaluate(model, test)
    spec = TrainingSpec(localEpochs=5, batchSize=32, learningRate=0.1, momentum=0.9)
    result = train_local(model, train, spec, seed=0)
    loss1, acc1 = evaluate(model, test)
    assert result.num_samples == len(train) and result.seconds > 0
    assert result.loss < 0.5 < loss0
    assert loss1 < loss0 / 3
    assert acc0 < 0.3 and acc1 > 0.9


def test_adam_and_cnn_train(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    train, test = digits
    model = build_model(ModelSpec(name="cnn", channels=[8, 16]), (1, 8, 8), 10, seed=0)
    _, acc0 = evaluate(model, test)
    train_local(model, train, TrainingSpec(localEpochs=3, optimizer="adam", learningRate=0.01), seed=0)
    _, acc1 = evaluate(model, test)
    assert acc1 > 0.85 > acc0


def test_training_is_deterministic_and_leaves_global_rng(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    train, _ = digits
    spec = TrainingSpec(localEpochs=1, learningRate=0.05)
    dropout = ModelSpec(name="mlp", dropout=0.5)
    runs = []
    for seed in (1, 1, 2):
        model = build_model(dropout, (1, 8, 8), 10, seed=0)
        torch.manual_seed(99)
        rng_before = torch.random.get_rng_state()
        result = train_local(model, train.subset(np.arange(300)), spec, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), rng_before)
        runs.append((get_params(model), result.loss))
    (p1, l1), (p1b, l1b), (p2, _) = runs
    assert l1 == l1b and all(torch.equal(p1[k], p1b[k]) for k in p1)
    assert not all(torch.equal(p1[k], p2[k]) for k in p1)


def test_fedprox_keeps_weights_closer_to_global(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    train, _ = digits
    local = train.subset(np.flatnonzero(train.y < 3))  # a skewed client drifts far from the global model
    start = get_params(_mlp())
    distances = {}
    for mu in (0.0, 1.0):
        model = _mlp()
        spec = TrainingSpec(localEpochs=3, learningRate=0.05, momentum=0.9, proximalMu=mu)
        train_local(model, local, spec, seed=0, global_params=start)
        distances[mu] = _distance(get_params(model), start)
    assert distances[1.0] < 0.5 * distances[0.0]

    # without global_params the anchor is the weights at the start: same result
    model = _mlp()
    spec = TrainingSpec(localEpochs=3, learningRate=0.05, momentum=0.9, proximalMu=1.0)
    train_local(model, local, spec, seed=0)
    assert _distance(get_params(model), start) == pytest.approx(distances[1.0], rel=1e-6)


def test_fedprox_anchor_is_global_params_not_the_start() -> None:
    """With a huge mu the model is pulled towards global_params even from far away."""
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    data = ArrayDataset(x, (x[:, 0] > 0).astype(np.int64), 2)
    model = build_model(ModelSpec(name="mlp", hiddenSizes=[]), (4,), 2, seed=0)
    target = {k: torch.zeros_like(v) for k, v in get_params(model).items()}
    before = _distance(get_params(model), target)
    spec = TrainingSpec(localEpochs=20, learningRate=0.01, proximalMu=50.0)
    train_local(model, data, spec, seed=0, global_params=target)
    assert _distance(get_params(model), target) < 0.1 * before


def test_evaluate_restores_mode_and_matches_manual(digits: tuple[ArrayDataset, ArrayDataset]) -> None:
    _, test = digits
    model = _mlp()
    model.train()
    loss, acc = evaluate(model, test, batch_size=50)
    assert model.training
    with torch.no_grad():
        logits = model(torch.from_numpy(test.x))
        y = torch.from_numpy(test.y)
        assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
        assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    model.eval()
    evaluate(model, test)
    assert not model.training


def test_training_on_read_only_arrays_and_empty_data() -> None:
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    y = np.arange(10) % 2
    ds = ArrayDataset(x, y, 2)
    ds.x.flags.writeable = False
    model = build_model(ModelSpec(name="mlp"), (3,), 2, seed=0)
    result = train_local(model, ds, TrainingSpec(batchSize=4), seed=0)
    assert result.num_samples == 10 and np.isfinite(result.loss)
    empty = ArrayDataset(np.zeros((0, 3), dtype=np.float32), np.zeros(0, dtype=np.int64), 2)
    with pytest.raises(ValueError, match="no training samples"):
        train_local(model, empty, TrainingSpec(), seed=0)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, empty)
