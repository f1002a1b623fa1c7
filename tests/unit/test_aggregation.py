from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from federator.api.models import ServerOptimizerSpec
from federator.runtime.aggregation import (
    FedAvgAccumulator,
    ServerOptimizerState,
    server_update,
    state_from_dict,
    state_to_dict,
    weighted_average,
)
from federator.runtime.checkpoint import load_checkpoint, save_checkpoint
from federator.runtime.training import Params


def _clone(p: Params) -> Params:
    return {k: v.clone() for k, v in p.items()}


def _assert_same(a: Params, b: Params) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _updates(n: int = 4, seed: int = 0) -> list[Params]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(3, 5, generator=g),
            "b": torch.randn(5, generator=g, dtype=torch.float64),
            "h": torch.randn(4, generator=g).half(),
            "bn.num_batches_tracked": torch.tensor(10 + i),
        }
        for i in range(n)
    ]


# -------------------------------------------------------------------------------------- weighted avg


def test_weighted_average_hand_computed() -> None:
    u1 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    u2 = {"w": torch.tensor([4.0, -1.0]), "n": torch.tensor(7)}
    out = weighted_average([u1, u2], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([(1 + 12) / 4, (2 - 3) / 4]))
    assert out["w"].dtype == torch.float32
    assert out["n"].item() == 3 and out["n"].dtype == torch.int64


def test_weighted_average_keeps_dtypes_and_matches_numpy() -> None:
    ups = _updates()
    weights = [10.0, 1.0, 5.0, 0.5]
    before = [_clone(u) for u in ups]
    out = weighted_average(ups, weights)
    for u, b in zip(ups, before, strict=True):
        _assert_same(u, b)  # inputs untouched
    for k in ("w", "b", "h"):
        assert out[k].dtype == ups[0][k].dtype
        expected = sum(w * u[k].double().numpy() for u, w in zip(ups, weights, strict=True)) / sum(weights)
        tol = 1e-3 if k == "h" else 1e-6
        np.testing.assert_allclose(out[k].double().numpy(), expected, rtol=tol, atol=tol)
    assert out["bn.num_batches_tracked"].item() == 10
    assert out["w"].data_ptr() != ups[0]["w"].data_ptr()
    out["bn.num_batches_tracked"] += 1
    assert ups[0]["bn.num_batches_tracked"].item() == 10  # result does not alias an input


def test_equal_updates_average_to_themselves() -> None:
    u = _updates(1)[0]
    out = weighted_average([u, u, u], [1.0, 2.0, 3.0])
    assert torch.allclose(out["w"], u["w"])


def test_weighted_average_errors() -> None:
    ups = _updates(2)
    with pytest.raises(ValueError, match="no updates"):
        weighted_average([], [])
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        weighted_average(ups, [1.0])
    with pytest.raises(ValueError, match="total weight"):
        weighted_average(ups, [0.0, 0.0])
    with pytest.raises(ValueError, match=">= 0"):
        weighted_average(ups, [1.0, -1.0])
    with pytest.raises(ValueError, match="finite"):
        weighted_average(ups, [1.0, float("nan")])
    bad_keys = dict(ups[1])
    del bad_keys["b"]
    with pytest.raises(ValueError, match=r"keys differ \(missing \['b'\]"):
        weighted_average([ups[0], bad_keys], [1.0, 1.0])
    bad_shape = dict(ups[1], w=torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"'w' has shape \(5, 3\), expected \(3, 5\)"):
        weighted_average([ups[0], bad_shape], [1.0, 1.0])


def test_accumulator_equals_weighted_average_exactly() -> None:
    ups = _updates(6, seed=3)
    weights = [3.0, 17.0, 1.0, 250.0, 8.0, 1.5]
    before = [_clone(u) for u in ups]
    acc = FedAvgAccumulator()
    for u, w in zip(ups, weights, strict=True):
        acc.add(u, w)
    assert acc.count == 6 and acc.total_weight == sum(weights)
    _assert_same(acc.result(), weighted_average(ups, weights))
    _assert_same(acc.result(), acc.result())  # result() does not consume
    for u, b in zip(ups, before, strict=True):
        _assert_same(u, b)
    acc.add(ups[0], 1.0)
    _assert_same(acc.result(), weighted_average([*ups, ups[0]], [*weights, 1.0]))


def test_accumulator_blocks_give_the_whole_tensor_arithmetic_bit_for_bit() -> None:
    """The float32 path folds in blocks; every element (the last partial block, a non-contiguous view, a
    float64 input) must come out as float64(t) * w summed with torch's whole-tensor ops."""
    from federator.runtime.aggregation.fedavg import _BLOCK

    g = torch.Generator().manual_seed(11)
    n = 2 * _BLOCK + 12345
    ups = [{"w": torch.randn(n, generator=g), "m": torch.randn(40, 30, generator=g).t(),
            "d": torch.randn(7, dtype=torch.float64, generator=g)} for _ in range(3)]
    weights = [3.0, 0.1, 17.25]
    acc = FedAvgAccumulator()
    for u, w in zip(ups, weights, strict=True):
        acc.add(u, w)
    for k in ups[0]:
        want = ups[0][k].to(torch.float64) * weights[0]
        for u, w in zip(ups[1:], weights[1:], strict=True):
            want = want.add(u[k].to(torch.float64), alpha=w)
        assert torch.equal(acc._sums[k], want), k
        assert torch.equal(acc.result()[k], (want / sum(weights)).to(ups[0][k].dtype)), k


def test_accumulator_reset_reuses_buffers_and_forgets_the_previous_mean() -> None:
    first, second = _updates(3, seed=5), _updates(4, seed=6)
    acc = FedAvgAccumulator()
    for u in first:
        acc.add(u, 2.0)
    buffers = {k: t.data_ptr() for k, t in acc._sums.items()}
    acc.reset()
    assert acc.count == 0 and acc.total_weight == 0.0
    weights = [1.0, 5.0, 0.5, 9.0]
    for u, w in zip(second, weights, strict=True):
        acc.add(u, w)
    _assert_same(acc.result(), weighted_average(second, weights))  # nothing of `first` left
    assert {k: t.data_ptr() for k, t in acc._sums.items()} == buffers  # same memory, no new allocation
    acc.reset()
    other = {"z": torch.ones(3, dtype=torch.float32)}  # another layout after a reset: fresh buffers
    acc.add(other, 1.0)
    _assert_same(acc.result(), other)


def test_accumulator_errors() -> None:
    acc = FedAvgAccumulator()
    with pytest.raises(ValueError, match="no updates"):
        acc.result()
    acc.add({"w": torch.ones(2)}, 1.0)
    with pytest.raises(ValueError, match="keys differ"):
        acc.add({"v": torch.ones(2)}, 1.0)
    assert acc.count == 1


# ---------------------------------------------------------------------------------- server optimizers


def _pair() -> tuple[Params, Params]:
    g = {"w": torch.tensor([0.5, -1.0, 2.0]), "n": torch.tensor(4)}
    a = {"w": torch.tensor([0.7, -1.5, 2.0]), "n": torch.tensor(9)}
    return g, a


def test_sgd_lr1_is_exactly_fedavg() -> None:
    g, a = _updates(2, seed=7)
    gc, ac = _clone(g), _clone(a)
    state = ServerOptimizerState()
    new, new_state = server_update(g, a, ServerOptimizerSpec(name="sgd", learningRate=1.0), state)
    _assert_same(new, a)
    assert new["w"].data_ptr() != a["w"].data_ptr()
    _assert_same(g, gc)
    _assert_same(a, ac)
    assert new_state.step == 1 and state.step == 0


def test_sgd_server_lr_and_momentum() -> None:
    g, a = _pair()
    spec = ServerOptimizerSpec(name="sgd", learningRate=0.5, momentum=0.9)
    new, s1 = server_update(g, a, spec, ServerOptimizerState())
    delta = np.array([0.2, -0.5, 0.0])
    np.testing.assert_allclose(new["w"].numpy(), g["w"].numpy() + 0.5 * delta, rtol=1e-6)
    assert new["n"].item() == 9  # non-float tensors come from the aggregate
    new2, s2 = server_update(new, a, spec, s1)
    delta2 = a["w"].numpy() - new["w"].numpy()
    buf = 0.9 * delta + delta2
    np.testing.assert_allclose(new2["w"].numpy(), new["w"].numpy() + 0.5 * buf, rtol=1e-6, atol=1e-7)
    assert s2.step == 2
    np.testing.assert_allclose(s1.m["w"].numpy(), delta, rtol=1e-6, atol=1e-7)  # s1 unchanged by round 2


def _adaptive_reference(name: str, g: np.ndarray, a: np.ndarray, spec: ServerOptimizerSpec, rounds: int
                        ) -> np.ndarray:
    """Reddi et al. 2021, Algorithm 2, in float64 numpy; v starts at tau^2 and m at 0."""
    x = g.astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, spec.tau**2)
    for _ in range(rounds):
        d = a - x
        m = spec.beta1 * m + (1 - spec.beta1) * d
        if name == "adam":
            v = spec.beta2 * v + (1 - spec.beta2) * d**2
        elif name == "yogi":
            v = v - (1 - spec.beta2) * d**2 * np.sign(v - d**2)
        else:
            v = v + d**2
        x = x + spec.learningRate * m / (np.sqrt(v) + spec.tau)
    return x


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_adaptive_optimizers_match_hand_computation(name: str) -> None:
    g, a = _pair()
    gc, ac = _clone(g), _clone(a)
    spec = ServerOptimizerSpec(name=name, learningRate=0.1, beta1=0.9, beta2=0.99, tau=1e-3)  # type: ignore[arg-type]
    state = ServerOptimizerState()
    new, state = server_update(g, a, spec, state)
    ref1 = _adaptive_reference(name, g["w"].numpy(), a["w"].numpy(), spec, rounds=1)
    np.testing.assert_allclose(new["w"].numpy(), ref1, rtol=1e-5, atol=1e-6)
    assert new["n"].item() == 9 and state.step == 1
    for _ in range(2):
        new, state = server_update(new, a, spec, state)
    ref3 = _adaptive_reference(name, g["w"].numpy(), a["w"].numpy(), spec, rounds=3)
    np.testing.assert_allclose(new["w"].numpy(), ref3, rtol=1e-5, atol=1e-6)
    _assert_same(g, gc)
    _assert_same(a, ac)


def test_fedadam_first_step_by_hand() -> None:
    """One step written out: m = 0.1 d, v = 0.99 tau^2 + 0.01 d^2, x += lr m / (sqrt(v) + tau)."""
    g = {"w": torch.tensor([1.0])}
    a = {"w": torch.tensor([3.0])}
    spec = ServerOptimizerSpec(name="adam", learningRate=1.0, beta1=0.9, beta2=0.99, tau=0.01)
    new, state = server_update(g, a, spec, ServerOptimizerState())
    m, v = 0.1 * 2.0, 0.99 * 1e-4 + 0.01 * 4.0
    assert new["w"].item() == pytest.approx(1.0 + m / (v**0.5 + 0.01), rel=1e-6)
    assert state.m["w"].item() == pytest.approx(m) and state.v["w"].item() == pytest.approx(v, rel=1e-6)


def test_fedyogi_first_step_by_hand() -> None:
    g = {"w": torch.tensor([1.0])}
    a = {"w": torch.tensor([3.0])}
    spec = ServerOptimizerSpec(name="yogi", learningRate=1.0, beta1=0.9, beta2=0.99, tau=0.01)
    new, state = server_update(g, a, spec, ServerOptimizerState())
    # v0 = 1e-4 < d^2 = 4, so sign(v0 - d^2) = -1 and v grows: v = 1e-4 + 0.01 * 4
    m, v = 0.2, 1e-4 + 0.04
    assert state.v["w"].item() == pytest.approx(v, rel=1e-6)
    assert new["w"].item() == pytest.approx(1.0 + m / (v**0.5 + 0.01), rel=1e-6)


def test_server_update_does_not_mutate_state() -> None:
    g, a = _pair()
    spec = ServerOptimizerSpec(name="adam", learningRate=0.1)
    _, s1 = server_update(g, a, spec, ServerOptimizerState())
    s1_copy = ServerOptimizerState(step=s1.step, m=_clone(s1.m), v=_clone(s1.v))
    _, s2 = server_update(g, a, spec, s1)
    assert s1.step == s1_copy.step
    _assert_same(s1.m, s1_copy.m)
    _assert_same(s1.v, s1_copy.v)
    assert not torch.equal(s2.m["w"], s1.m["w"])


def test_server_update_errors() -> None:
    g, a = _pair()
    with pytest.raises(ValueError, match="keys differ"):
        server_update(g, {"w": a["w"]}, ServerOptimizerSpec(), ServerOptimizerState())
    bad_state = ServerOptimizerState(step=1, m={"w": torch.zeros(2)}, v={"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="model changed"):
        server_update(g, a, ServerOptimizerSpec(name="adam"), bad_state)


def test_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    g, a = _pair()
    _, state = server_update(g, a, ServerOptimizerSpec(name="yogi"), ServerOptimizerState())
    path = tmp_path / "opt.pt"
    save_checkpoint(path, {"opt": state_to_dict(state)})
    loaded = load_checkpoint(path)
    assert loaded is not None
    back = state_from_dict(loaded["opt"])
    assert back.step == state.step
    _assert_same(back.m, state.m)
    _assert_same(back.v, state.v)
    with pytest.raises(ValueError, match="step"):
        state_from_dict({"step": -1})
    with pytest.raises(ValueError, match="m must map"):
        state_from_dict({"step": 1, "m": {"w": [1.0]}})
