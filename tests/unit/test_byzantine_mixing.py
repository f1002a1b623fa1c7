"""Nearest-neighbour mixing (NNM, Allouah et al. 2023): the kernel against a loop over numpy, its properties,
its tolerance, and the pre-step in the spec and the aggregation pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from federator.api.buffer import needs_buffer
from federator.api.models import FederationSpec
from federator.api.tolerance import ROBUST_RULES, rule_tolerance
from federator.runtime import robust
from federator.runtime.aggregation import AggregationPipeline, AggregationState
from federator.runtime.training import Params


def stack(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 3 + torch.randn(d, generator=g)


def ref_nnm(x: np.ndarray, f: int) -> np.ndarray:
    """Row by row: the mean of the n - f rows nearest to it (itself first), distances in float64."""
    x = x.astype(np.float64)
    n = x.shape[0]
    out = np.empty_like(x)
    for i in range(n):
        dist = [0.0 if j == i else float(np.sum((x[i] - x[j]) ** 2)) for j in range(n)]
        order = sorted(range(n), key=lambda j: (j != i, dist[j], j))
        out[i] = np.mean([x[j] for j in order[: n - f]], axis=0)
    return out


@pytest.mark.parametrize(("n", "d", "f"), [(1, 4, 0), (5, 7, 1), (7, 3, 0), (10, 50, 3), (20, 200, 6), (13, 33, 6)])
def test_nnm_matches_the_loop_reference(n: int, d: int, f: int) -> None:
    x = stack(n, d, seed=n * 100 + f)
    got = robust.nnm(x, f)
    assert got.shape == (n, d) and got.dtype == x.dtype
    np.testing.assert_allclose(got.numpy(), ref_nnm(x.numpy(), f), rtol=1e-5, atol=1e-5)


def test_nnm_stays_exact_on_long_close_rows() -> None:
    """Full models rather than deltas: |a|^2 + |b|^2 - 2ab cancels in float32, so the Gram matrix is re-centred;
    the neighbours (hence the output) must still be the float64 reference's."""
    g = torch.Generator().manual_seed(3)
    x = 100.0 + 1e-3 * torch.randn(12, 20_000, generator=g)
    np.testing.assert_allclose(robust.nnm(x, 4).numpy(), ref_nnm(x.numpy(), 4), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("f", [0, 2, 4])
def test_nnm_is_permutation_equivariant(f: int) -> None:
    x = stack(9, 40, seed=7)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(robust.nnm(x[perm], f), robust.nnm(x, f)[perm], rtol=1e-5, atol=1e-5)


def test_identical_inputs_are_left_as_they_are() -> None:
    x = torch.randn(1, 30, generator=torch.Generator().manual_seed(2)).repeat(8, 1)
    for f in (0, 3, 7):
        torch.testing.assert_close(robust.nnm(x, f), x, rtol=1e-6, atol=1e-7)


def test_nnm_leaves_its_input_unchanged_and_returns_a_new_tensor() -> None:
    base = stack(8, 60, seed=4)
    for x in (base, base[:, ::2], base.t().contiguous().t()):  # contiguous, strided, transposed layout
        before = x.clone()
        out = robust.nnm(x, 2)
        assert torch.equal(x, before)
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_with_f_outliers_no_honest_row_mixes_an_outlier() -> None:
    """f huge rows: every honest row's n - f nearest are honest, so its mixed row stays among the honest rows."""
    honest = stack(7, 20, seed=5)
    x = torch.cat([honest, torch.full((3, 20), 1e6)])
    out = robust.nnm(x, 3)
    assert float(out[:7].abs().max()) <= float(honest.abs().max())
    torch.testing.assert_close(out[:7], honest.mean(0).expand(7, 20), rtol=1e-5, atol=1e-5)  # n - f = the 7 honest


def test_nnm_names_a_bad_f() -> None:
    x = stack(4, 3, seed=0)
    for f in (-1, 4, 9):
        with pytest.raises(ValueError, match="nnm needs 0 <= f < n"):
            robust.nnm(x, f)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 11, 20, 31])
def test_the_api_tolerance_with_nnm_is_the_kernels(n: int) -> None:
    for rule in ("fedavg", *ROBUST_RULES):
        for nnm_f in (None, 0, 1, 3, 9):
            params: dict[str, Any] = {"trim_fraction": 0.3} if rule == "trimmed_mean" else {}
            want = robust.nnm_tolerance(rule, n, nnm_f, **params)
            assert rule_tolerance(rule, n, 0.3, nnm=True, nnm_f=nnm_f) == want, (rule, n, nnm_f)
            # NNM keeps the rule's tolerance when its f is not the smaller
            assert want == min(rule_tolerance(rule, n, 0.3), n if nnm_f is None else nnm_f)


# ------------------------------------------------------------------------------------------- the spec


def spec(agg: dict[str, Any], fraction: float = 0.3, n: int = 10, **sections: Any) -> FederationSpec:
    return FederationSpec.model_validate({
        "rounds": 1, "clients": {"count": n}, "aggregation": agg,
        "byzantine": {"expectedFraction": fraction, **sections.get("byzantine", {})}})


def test_nnm_keeps_the_rules_tolerance_in_the_spec_check() -> None:
    for agg in ({"rule": "median"}, {"rule": "multi_krum"}, {"rule": "trimmed_mean", "trimFraction": 0.3},
                {"rule": "geometric_median"}, {"rule": "centered_clipping"}, {"rule": "krum"}):
        assert spec({**agg, "nnm": {}}).aggregation.nnm is not None  # 3 of 10: each rule alone passes, and with nnm
    with pytest.raises(ValidationError, match="trimmed_mean tolerates at most 2 of 10"):
        spec({"rule": "trimmed_mean", "trimFraction": 0.2, "nnm": {}})  # nnm does not raise a rule's tolerance
    with pytest.raises(ValidationError, match="fedavg tolerates at most 0"):
        spec({"rule": "fedavg", "nnm": {}})


def test_an_nnm_f_below_the_expected_count_is_refused_with_the_fix() -> None:
    with pytest.raises(ValidationError) as err:
        spec({"rule": "median", "nnm": {"f": 2}})
    msg = str(err.value)
    assert "aggregation.rule=median tolerates at most 2 of 10" in msg and "aggregation.nnm.f >= 3" in msg
    assert spec({"rule": "median", "nnm": {"f": 3}}).aggregation.nnm is not None


def test_nnm_and_bucketing_together_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"nnm and aggregation\.bucketing are two remedies"):
        spec({"rule": "median", "nnm": {}, "bucketing": {"size": 2}}, fraction=0.1)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        spec({"rule": "median", "nnm": {"f": -1}})


def test_nnm_buffers_the_round_even_before_fedavg() -> None:
    assert needs_buffer(spec({"rule": "fedavg", "nnm": {}}, fraction=0.0))
    assert not needs_buffer(spec({"rule": "fedavg"}, fraction=0.0))


# --------------------------------------------------------------------------------------- the pipeline


def _model(seed: int) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g),
            "count": torch.tensor(seed, dtype=torch.long)}


def _round(s: FederationSpec, glob: Params, ups: list[tuple[str, Params]]) -> torch.Tensor:
    pipe = AggregationPipeline(s, glob)
    agg = pipe.begin_round(1, glob, len(ups), [c for c, _ in ups])
    for c, p in ups:
        agg.add(c, p, 1.0)
    out = agg.finish(AggregationState()).aggregate
    return torch.cat([out["w"].reshape(-1), out["b"]])


@pytest.mark.parametrize(("agg", "kernel"), [
    ({"rule": "median"}, robust.coordinate_median),
    ({"rule": "multi_krum"}, lambda x: robust.multi_krum(x, 3, 7)),
    ({"rule": "trimmed_mean", "trimFraction": 0.3}, lambda x: robust.trimmed_mean(x, 0.3)),
    ({"rule": "fedavg"}, robust.fedavg),
])
def test_the_pipeline_runs_the_rule_on_the_mixed_rows(agg: dict[str, Any], kernel: Any) -> None:
    glob = _model(0)
    ups = [(f"sim-{i}", _model(i + 1)) for i in range(10)]
    rows = torch.stack([torch.cat([p["w"].reshape(-1), p["b"]]) for _, p in ups])
    start = torch.cat([glob["w"].reshape(-1), glob["b"]])
    fraction = 0.0 if agg["rule"] == "fedavg" else 0.3
    got = _round(spec({**agg, "nnm": {}}, fraction=fraction), glob, ups)
    f = 3 if fraction else 0  # nnm's f defaults to the expected count: 0.3 of 10
    want = start + kernel(robust.nnm(rows - start, f))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if agg["rule"] != "fedavg":  # and mixing changes the result (the test would not see a skipped pre-step)
        assert not torch.allclose(got, _round(spec(agg), glob, ups), rtol=1e-4, atol=1e-4)


def test_the_pipeline_uses_nnm_f_when_given() -> None:
    glob = _model(0)
    ups = [(f"sim-{i}", _model(i + 1)) for i in range(10)]
    rows = torch.stack([torch.cat([p["w"].reshape(-1), p["b"]]) for _, p in ups])
    start = torch.cat([glob["w"].reshape(-1), glob["b"]])
    got = _round(spec({"rule": "median", "nnm": {"f": 4}}), glob, ups)
    torch.testing.assert_close(got, start + robust.coordinate_median(robust.nnm(rows - start, 4)),
                               rtol=1e-5, atol=1e-5)
