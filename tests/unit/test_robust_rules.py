"""The robust aggregation kernels against plain loop implementations over numpy, and their properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from federator.runtime import robust

# (n, d, f): small and odd/even n, d across several column blocks (the threaded path) in the last one.
SHAPES = [(5, 7, 1), (10, 33, 3), (13, 50, 5), (20, 2 * robust._CHUNK + 17, 4)]


def stack(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + 0.5  # off-centre, like full models rather than deltas


# --- plain references: loops over numpy, float64 ---------------------------------------------------------


def ref_median(x: np.ndarray) -> np.ndarray:
    n, d = x.shape
    out = np.empty(d)
    for j in range(d):
        col = sorted(float(v) for v in x[:, j])
        out[j] = col[n // 2] if n % 2 else (col[n // 2 - 1] + col[n // 2]) / 2
    return out


def ref_trimmed_mean(x: np.ndarray, trim: float) -> np.ndarray:
    n, d = x.shape
    k = math.floor(trim * n)
    return np.array([np.mean(sorted(float(v) for v in x[:, j])[k : n - k]) for j in range(d)])


def ref_krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    scores = []
    for i in range(n):
        dists = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dists[: n - f - 2]))
    return np.array(scores)


def ref_multi_krum(x: np.ndarray, f: int, m: int) -> np.ndarray:
    order = sorted(range(len(x)), key=lambda i: (ref_krum_scores(x, f)[i], i))
    return np.mean([x[i] for i in order[:m]], axis=0)


def ref_geometric_median(x: np.ndarray, w: np.ndarray | None, eps: float, tol: float, max_iter: int) -> np.ndarray:
    n = len(x)
    alpha = np.full(n, 1 / n) if w is None else w / w.sum()
    z = sum(alpha[i] * x[i] for i in range(n))

    def objective(z: np.ndarray) -> float:
        return sum(alpha[i] * max(eps, float(np.linalg.norm(x[i] - z))) for i in range(n))

    obj = objective(z)
    for _ in range(max_iter):
        beta = np.array([alpha[i] / max(eps, float(np.linalg.norm(x[i] - z))) for i in range(n)])
        z = sum(beta[i] * x[i] for i in range(n)) / beta.sum()
        new = objective(z)
        if abs(obj - new) <= tol * new:
            break
        obj = new
    return z


def ref_centered_clipping(x: np.ndarray, v: np.ndarray, tau: float, iterations: int) -> np.ndarray:
    n = len(x)
    for _ in range(iterations):
        step = np.zeros_like(v)
        for i in range(n):
            diff = x[i] - v
            norm = float(np.linalg.norm(diff))
            step += diff * min(1.0, tau / norm) if norm > 0 else 0 * diff
        v = v + step / n
    return v


# --- each rule against its reference ----------------------------------------------------------------------


def close(got: torch.Tensor, want: np.ndarray, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize(("n", "d", "f"), SHAPES)
def test_fedavg_matches_reference(n: int, d: int, f: int) -> None:
    x = stack(n, d, 1)
    w = torch.arange(1, n + 1, dtype=torch.float64)
    xn = x.double().numpy()
    close(robust.fedavg(x), np.mean(xn, axis=0))
    close(robust.fedavg(x, w), sum(w[i].item() * xn[i] for i in range(n)) / w.sum().item())


@pytest.mark.parametrize(("n", "d", "f"), SHAPES)
def test_median_matches_reference(n: int, d: int, f: int) -> None:
    x = stack(n, d, 2)
    want = ref_median(x.double().numpy()) if d < 100 else np.median(x.double().numpy(), axis=0)
    close(robust.coordinate_median(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("n", "d", "f"), SHAPES)
@pytest.mark.parametrize("trim", [0.1, 0.25, 0.4])
def test_trimmed_mean_matches_reference(n: int, d: int, f: int, trim: float) -> None:
    x = stack(n, d, 3)
    close(robust.trimmed_mean(x, trim), ref_trimmed_mean(x.double().numpy(), trim), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "d", "f"), SHAPES[:3])
def test_krum_and_multi_krum_match_reference(n: int, d: int, f: int) -> None:
    x = stack(n, d, 4)
    xn = x.double().numpy()
    scores = ref_krum_scores(xn, f)
    close(robust.krum_scores(x, f), scores, rtol=1e-4, atol=1e-3)
    close(robust.krum(x, f), xn[int(np.argmin(scores))], rtol=0, atol=0)
    for m in (2, n - f):
        close(robust.multi_krum(x, f, m), ref_multi_krum(xn, f, m), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "d", "f"), SHAPES)
def test_geometric_median_matches_weiszfeld(n: int, d: int, f: int) -> None:
    x = stack(n, d, 5)
    xn = x.double().numpy()
    w = torch.linspace(1, 3, n, dtype=torch.float64)
    close(robust.geometric_median(x), ref_geometric_median(xn, None, 1e-8, 1e-6, 100), rtol=1e-4, atol=1e-4)
    got = robust.geometric_median(x, weights=w, tol=0, max_iter=5)
    close(got, ref_geometric_median(xn, w.numpy(), 1e-8, 0, 5), rtol=1e-4, atol=1e-4)


def test_geometric_median_is_the_median_in_one_dimension() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [1000.0]])
    assert robust.geometric_median(x, tol=1e-12, max_iter=1000).item() == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize(("n", "d", "f"), SHAPES)
@pytest.mark.parametrize(("tau", "iterations"), [(0.5, 1), (3.0, 3)])
@pytest.mark.parametrize("start", ["random", "zero"])
def test_centered_clipping_matches_reference(n: int, d: int, f: int, tau: float, iterations: int, start: str) -> None:
    x = stack(n, d, 6)
    ref = torch.randn(d, generator=torch.Generator().manual_seed(7)) if start == "random" else torch.zeros(d)
    got = robust.centered_clipping(x, ref, tau, iterations)
    want = ref_centered_clipping(x.double().numpy(), ref.double().numpy(), tau, iterations)
    close(got, want, rtol=1e-4, atol=1e-4)


def test_centered_clipping_from_zero_keeps_zero_rows_and_short_rows() -> None:
    """The first round (reference 0) takes its distances from the row norms: a zero row and rows
    shorter than tau count in full, long ones are clipped to tau."""
    x = stack(6, 40, 13)
    x[0] = 0.0
    x[1] *= 1e-3
    x[2] *= 1e4
    tau = float(x[3].norm())
    want = ref_centered_clipping(x.double().numpy(), np.zeros(40), tau, 1)
    close(robust.centered_clipping(x, torch.zeros(40), tau, 1), want, rtol=1e-5, atol=1e-5)
    close(robust.centered_clipping(x, torch.zeros(40, dtype=torch.float64), tau, 2),
          ref_centered_clipping(x.double().numpy(), np.zeros(40), tau, 2), rtol=1e-5, atol=1e-5)


def test_centered_clipping_state_passes_from_round_to_round() -> None:
    rounds = [stack(8, 40, s) for s in (10, 11, 12)]
    v = torch.zeros(40)
    want = np.zeros(40)
    for x in rounds:
        v = robust.centered_clipping(x, v, 1.0, 2)
        want = ref_centered_clipping(x.double().numpy(), want, 1.0, 2)
    close(v, want)


def test_norm_clip_scales_long_rows_only() -> None:
    x = stack(6, 30, 8)
    norms = x.norm(dim=1)
    limit = float(norms.median())
    got = robust.norm_clip(x, limit)
    assert got.shape == x.shape
    for i in range(6):
        want = x[i] * min(1.0, limit / float(norms[i]))
        close(got[i], want.double().numpy(), rtol=1e-6, atol=1e-6)
    assert float(got.norm(dim=1).max()) <= limit * (1 + 1e-6)


@pytest.mark.parametrize(("n", "s"), [(10, 2), (10, 3), (7, 7), (5, 1)])
def test_bucketing_averages_random_groups(n: int, s: int) -> None:
    x = stack(n, 9, 9)
    got = robust.bucketing(x, s, torch.Generator().manual_seed(3))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    xn = x.double().numpy()
    want = np.array([np.mean([xn[i] for i in perm[b : b + s]], axis=0) for b in range(0, n, s)])
    assert got.shape == (math.ceil(n / s), 9)
    close(got, want, rtol=1e-6, atol=1e-6)
    again = robust.bucketing(x, s, torch.Generator().manual_seed(3))
    assert torch.equal(got, again)


# --- properties ---------------------------------------------------------------------------------------------

ALL_RULES = {
    "fedavg": lambda x: robust.fedavg(x),
    "median": robust.coordinate_median,
    "trimmed_mean": lambda x: robust.trimmed_mean(x, 0.3),
    "krum": lambda x: robust.krum(x, 3),
    "multi_krum": lambda x: robust.multi_krum(x, 3, 5),
    "geometric_median": lambda x: robust.geometric_median(x),
    "centered_clipping": lambda x: robust.centered_clipping(x, torch.zeros(x.shape[1]), 1.0, 3),
}


@pytest.mark.parametrize("rule", sorted(ALL_RULES))
def test_permutation_invariant(rule: str) -> None:
    x = stack(11, 64, 20)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    a, b = ALL_RULES[rule](x), ALL_RULES[rule](x[perm])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", sorted(ALL_RULES))
def test_identical_inputs_give_that_input(rule: str) -> None:
    row = stack(1, 70, 21)[0]
    x = row.expand(9, 70)  # a view with stride 0 over the clients: the kernels must not write to it
    out = ALL_RULES[rule](x)
    if rule == "centered_clipping":
        # each of the 3 steps moves from the reference (0) towards the point by tau = 1
        torch.testing.assert_close(out, row * (3.0 / float(row.norm())), rtol=1e-5, atol=1e-5)
        out = robust.centered_clipping(x, torch.zeros(70), tau=1e9, iterations=1)
    torch.testing.assert_close(out, row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", sorted(ALL_RULES))
def test_inputs_unchanged_and_output_is_new(rule: str) -> None:
    big = stack(13, 90, 22)
    x = big[1:12, 5:85]  # a non-contiguous view into a larger buffer
    before = big.clone()
    out = ALL_RULES[rule](x)
    assert torch.equal(big, before)
    assert out.shape == (80,)
    assert out.untyped_storage().data_ptr() != big.untyped_storage().data_ptr()


def test_pre_steps_leave_inputs_unchanged() -> None:
    x = stack(8, 40, 23)
    before = x.clone()
    robust.norm_clip(x, 0.1).add_(1.0)
    robust.bucketing(x, 3).add_(1.0)
    assert torch.equal(x, before)


def with_attackers(n: int, f: int, d: int = 50, seed: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    honest = stack(n - f, d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    bad = torch.randn(f, d, generator=g).sign() * 1e6 * (1 + torch.rand(f, d, generator=g))
    return torch.cat([bad, honest]), honest


@pytest.mark.parametrize(("n", "f"), [(10, 3), (11, 4), (25, 11)])
def test_coordinate_rules_stay_in_the_honest_range(n: int, f: int) -> None:
    x, honest = with_attackers(n, f)
    lo, hi = honest.min(dim=0).values, honest.max(dim=0).values
    assert f <= robust.max_byzantine("median", n)
    trim = (f + 0.5) / n
    assert f <= robust.max_byzantine("trimmed_mean", n, trim_fraction=trim)
    for out in (robust.coordinate_median(x), robust.trimmed_mean(x, trim)):
        assert bool(((out >= lo) & (out <= hi)).all())


@pytest.mark.parametrize(("n", "f"), [(10, 3), (25, 11)])
def test_distance_rules_stay_near_the_honest_points(n: int, f: int) -> None:
    x, honest = with_attackers(n, f)
    radius = float((honest - honest.mean(dim=0)).norm(dim=1).max())
    centre = honest.mean(dim=0)
    assert f <= robust.max_byzantine("krum", n, f=f) and f <= robust.max_byzantine("geometric_median", n)
    chosen = robust.krum(x, f)
    assert any(torch.equal(chosen, h) for h in honest)
    assert float((robust.multi_krum(x, f, n - f) - centre).norm()) <= radius
    # Weiszfeld converges slowly when outliers are 1e6 away: a bound, not the optimum, is what is asserted
    assert float((robust.geometric_median(x, max_iter=1000) - centre).norm()) <= 3 * radius
    cc = robust.centered_clipping(x, torch.zeros(x.shape[1]), tau=radius, iterations=5)
    assert float((cc - centre).norm()) <= 3 * radius


def test_fedavg_is_not_robust() -> None:
    """The bound above is a real property: the mean moves with one large input."""
    x, honest = with_attackers(10, 1)
    assert float((robust.fedavg(x) - honest.mean(dim=0)).norm()) > 1e4
    assert robust.max_byzantine("fedavg", 10) == 0


def test_krum_with_too_few_neighbours_names_the_limit() -> None:
    with pytest.raises(ValueError, match=r"n - f - 2 >= 1.*f <= 2"):
        robust.krum_scores(stack(5, 4, 0), 3)
    with pytest.raises(ValueError, match=r"m must be in \[1, n=5\]"):
        robust.multi_krum(stack(5, 4, 0), 1, 6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: robust.trimmed_mean(stack(4, 3, 0), 0.5), "trim_fraction must be in"),
        (lambda: robust.fedavg(stack(4, 3, 0), torch.ones(3)), "weights has 3 entries for 4"),
        (lambda: robust.fedavg(stack(4, 3, 0), torch.zeros(4)), "weights sum to 0"),
        (lambda: robust.coordinate_median(torch.zeros(3)), "2-d tensor"),
        (lambda: robust.coordinate_median(torch.zeros(0, 3)), "no rows"),
        (lambda: robust.centered_clipping(stack(4, 3, 0), torch.zeros(2), 1.0, 1), r"reference must have shape \(3,\)"),
        (lambda: robust.bucketing(stack(4, 3, 0), 0), "bucket size s must be >= 1"),
        (lambda: robust.norm_clip(stack(4, 3, 0), 0.0), "max_norm must be > 0"),
        (lambda: robust.max_byzantine("mode", 4), "unknown rule 'mode'"),
    ],
)
def test_bad_arguments_are_named(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()


def test_max_byzantine_values() -> None:
    mb = robust.max_byzantine
    assert [mb("median", n) for n in (1, 2, 3, 10, 11)] == [0, 0, 1, 4, 5]
    assert [mb("geometric_median", n) for n in (3, 10)] == [1, 4]
    assert [mb("centered_clipping", n) for n in (3, 10)] == [1, 4]
    assert mb("trimmed_mean", 10, trim_fraction=0.3) == 3
    assert mb("trimmed_mean", 10, trim_fraction=0.29) == 2
    assert [mb("krum", n) for n in (3, 4, 5, 10, 11)] == [0, 0, 1, 3, 4]  # largest f with n > 2f + 2
    assert mb("multi_krum", 10, f=3, m=4) == 3
    assert mb("krum", 10, f=4) == 0  # 10 > 2*4 + 2 fails: the configured f buys no guarantee
    # bucketing: the rule sees ceil(n / s) inputs
    assert mb("median", 20, bucket_size=2) == 4 and mb("median", 20) == 9
    assert mb("krum", 21, bucket_size=3) == 2
    assert mb("fedavg", 100, bucket_size=5) == 0


def test_rules_registry_names_every_rule() -> None:
    assert sorted(robust.RULES) == sorted(
        ["fedavg", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "centered_clipping"]
    )
    x = stack(10, 12, 40)
    assert torch.equal(robust.RULES["median"].fn(x), robust.coordinate_median(x))
    assert robust.RULES["krum"].tolerance == "n > 2f + 2"


def test_distance_rules_stay_exact_on_long_close_rows() -> None:
    """Full models (a large common offset, small differences): |a|^2 + |b|^2 - 2ab cancels in float32,
    so the Gram matrix and the clipping distances must be computed after a translation or directly."""
    g = torch.Generator().manual_seed(50)
    x = 100.0 + 1e-2 * torch.randn(12, 3000, generator=g)
    xn = x.double().numpy()
    f = 3
    scores = ref_krum_scores(xn, f)
    close(robust.krum_scores(x, f), scores, rtol=2e-3, atol=0)
    assert torch.equal(robust.krum(x, f), x[int(np.argmin(scores))])
    want = ref_geometric_median(xn, None, 1e-8, 1e-6, 100)
    close(robust.geometric_median(x) - 100.0, want - 100.0, rtol=0, atol=5e-5)  # float32 ulp at 100: 7.6e-6
    ref = x[0] + 1e-3
    want_cc = ref_centered_clipping(xn, ref.double().numpy(), 0.2, 2)
    close(robust.centered_clipping(x, ref, 0.2, 2) - 100.0, want_cc - 100.0, rtol=0, atol=5e-5)
