"""Robust aggregation kernels over stacked client updates; pure functions that never modify their input.

Every rule takes ``x``, a float tensor of shape ``(n, d)`` (one row per client; it may be a view into a
larger buffer) and returns a new ``(d,)`` tensor. State a rule carries across rounds (centered
clipping's reference point) is an explicit argument and return value, so the caller checkpoints it.

Sources:
- coordinate-wise median and trimmed mean: Yin et al. 2018, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates";
- Krum and Multi-Krum: Blanchard et al. 2017, "Machine Learning with Adversaries"; El Mhamdi et al. 2018;
- geometric median by smoothed Weiszfeld: Pillutla et al. 2022, "Robust Aggregation for Federated
  Learning" (RFA, Algorithm 2);
- centered clipping: Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine Robust
  Optimization";
- bucketing: Karimireddy, He and Jaggi 2022, "Byzantine-Robust Learning on Heterogeneous Datasets via
  Bucketing".

Speed: each kernel is a few large torch operations (BLAS matrix products, whole-tensor reductions) rather
than a loop of small ones: on a busy machine every OpenMP parallel region can wait a scheduler time slice
for a descheduled thread, so hundreds of small regions cost seconds. Where a rule needs a temporary of x's
size (a translated copy for the Gram matrix) it works on column blocks of at most ``_BLOCK_BYTES``;
median and trimmed mean are ``order_stats.middle_mean`` (a sorting network for small n, numpy's
vectorised sort on transposed tiles otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from federator.runtime.order_stats import middle_mean

# Default columns per block of ``_blocks``.
_CHUNK = 4096
# Scratch per translated block of the Gram matrix.
_BLOCK_BYTES = 32 << 20


def check_stack(x: torch.Tensor, name: str = "x") -> tuple[int, int]:
    """(n, d) of a stack of updates, or a ValueError naming what is wrong with it."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-d tensor (n clients, d parameters), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    n, d = x.shape
    if n == 0:
        raise ValueError(f"{name} has no rows: a rule needs at least one update")
    return n, d


def _check_weights(weights: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.numel() != n:
        raise ValueError(f"weights has {w.numel()} entries for {n} updates; pass one sample count per row")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and >= 0 (sample counts)")
    if float(w.sum()) <= 0:
        raise ValueError("weights sum to 0: at least one update needs a positive sample count")
    return w


def _blocks(d: int, chunk: int = _CHUNK) -> Iterator[slice]:
    for start in range(0, d, chunk):
        yield slice(start, min(start + chunk, d))


def fedavg(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of the rows, weighted by ``weights`` (sample counts) when given. Tolerates no Byzantine input."""
    n, _ = check_stack(x)
    w = _check_weights(weights, n)
    coef = torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device) if w is None else (w / w.sum()).to(x.dtype)
    return coef @ x  # one matrix-vector product: faster than x.mean(dim=0) on CPU


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median; for even n the mean of the two middle values (as ``numpy.median``)."""
    n, _ = check_stack(x)
    return middle_mean(x, (n - 1) // 2)  # the one or two middle values


def trimmed_mean(x: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Per-coordinate mean after dropping the ``floor(trim_fraction * n)`` smallest and largest values."""
    n, _ = check_stack(x)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    k = math.floor(trim_fraction * n)
    if k == 0:
        return fedavg(x)
    # float32 sums suffice: the trimmed values are gone, so no large value cancels
    return middle_mean(x, k)


# Relative rounding error to assume for a float32 dot product over d terms: unit roundoff * sqrt(d).
_F32_UNIT = 2.0**-24
# Distances between typical rows must come out of the plain Gram matrix with at most this relative error.
_GRAM_REL_ERROR = 1e-2


def _gram(x: torch.Tensor) -> torch.Tensor:
    """float64 (n, n) Gram matrix of the rows after one common translation (distances do not change).

    First the plain ``x @ x.T`` (one BLAS product). ``|a|^2 + |b|^2 - 2ab`` cancels when rows are long
    but close together (full models rather than deltas, or nearly identical updates); when the expected
    float32 rounding error would exceed ``_GRAM_REL_ERROR`` of the median distance at the scale of a
    typical row, the rows are translated by the row of median norm (an honest-scale anchor however large
    a minority of rows is) and the product is computed again, in column blocks.
    """
    n, d = x.shape
    gram = (x @ x.t()).to(torch.float64)
    if n < 2:
        return gram
    sq = gram.diagonal()
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    off = dist[~torch.eye(n, dtype=torch.bool, device=dist.device)]
    typical = float(sq.median())
    if 2 * _F32_UNIT * math.sqrt(d) * typical <= _GRAM_REL_ERROR * float(off.clamp(min=0).median()):
        return gram
    anchor = x[int(sq.argsort()[(n - 1) // 2])]
    width = max(1, min(d, _BLOCK_BYTES // (n * x.element_size())))
    scratch = torch.empty(n, width, dtype=x.dtype, device=x.device)
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for cols in _blocks(d, width):
        block = scratch[:, : cols.stop - cols.start]
        torch.sub(x[:, cols], anchor[cols], out=block)
        gram += (block @ block.t()).to(torch.float64)
    return gram


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 squared Euclidean distances between the rows, through the Gram matrix."""
    check_stack(x)
    gram = _gram(x)
    sq = gram.diagonal()
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    dist.clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    return dist


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """Each row's Krum score: the sum of its squared distances to its ``n - f - 2`` nearest other rows."""
    n, _ = check_stack(x)
    if f < 0:
        raise ValueError(f"f must be >= 0, got {f}")
    k = n - f - 2
    if k < 1:
        raise ValueError(f"Krum scores need n - f - 2 >= 1 neighbours; got n={n}, f={f} (use f <= {n - 3})")
    dist = pairwise_sq_distances(x)
    dist.fill_diagonal_(math.inf)
    return dist.topk(k, dim=1, largest=False).values.sum(dim=1)


def multi_krum(x: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """The mean of the ``m`` rows with the lowest Krum scores (ties broken by the lower row index)."""
    n, _ = check_stack(x)
    if not 1 <= m <= n:
        raise ValueError(f"m must be in [1, n={n}], got {m}")
    scores = krum_scores(x, f)
    order = torch.sort(scores, stable=True).indices[:m]
    if m == 1:
        return x[int(order[0])].clone()
    coef = torch.zeros(n, dtype=x.dtype, device=x.device)
    coef[order.to(x.device)] = 1.0 / m
    return coef @ x  # one matrix-vector product, no copy of the chosen rows


def krum(x: torch.Tensor, f: int) -> torch.Tensor:
    """The row with the lowest Krum score (a copy)."""
    return multi_krum(x, f, 1)


def geometric_median(
    x: torch.Tensor,
    weights: torch.Tensor | None = None,
    eps: float = 1e-8,
    tol: float = 1e-6,
    max_iter: int = 100,
) -> torch.Tensor:
    """Weighted geometric median by smoothed Weiszfeld (RFA): ``argmin_z sum_i w_i max(eps, |z - x_i|)``.

    Starts from the weighted mean; stops when the objective improves by less than ``tol`` times itself
    or after ``max_iter`` iterations. The iterate is always a convex combination of the rows, so the
    iterations run on its n coefficients through the Gram matrix and ``x`` is read twice in all
    (once for the Gram matrix, once for the result), whatever the number of iterations.
    """
    n, _ = check_stack(x)
    if eps <= 0 or tol < 0 or max_iter < 0:
        raise ValueError(f"need eps > 0, tol >= 0, max_iter >= 0; got eps={eps}, tol={tol}, max_iter={max_iter}")
    w = _check_weights(weights, n)
    alpha = torch.full((n,), 1.0 / n, dtype=torch.float64) if w is None else w / w.sum()
    alpha = alpha.to(x.device)
    if n == 1:
        return x[0].clone()
    gram = _gram(x)
    sq = gram.diagonal().clone()

    def distances(c: torch.Tensor) -> torch.Tensor:
        # |x_i - z|^2 with z = c^T x: G_ii - 2 (G c)_i + c^T G c
        gc = gram @ c
        return (sq - 2.0 * gc + c @ gc).clamp_(min=0.0).sqrt_()

    coef = alpha.clone()
    dist = distances(coef)
    objective = float(alpha @ dist.clamp(min=eps))
    for _ in range(max_iter):
        beta = alpha / dist.clamp(min=eps)
        coef = beta / beta.sum()
        dist = distances(coef)
        new_objective = float(alpha @ dist.clamp(min=eps))
        if abs(objective - new_objective) <= tol * new_objective:
            break
        objective = new_objective
    return coef.to(x.dtype) @ x


def centered_clipping(x: torch.Tensor, reference: torch.Tensor, tau: float, iterations: int = 1) -> torch.Tensor:
    """Centered clipping: ``v <- v + mean_i clip_tau(x_i - v)`` repeated ``iterations`` times from ``reference``.

    ``clip_tau(u) = u * min(1, tau / |u|)``. ``reference`` is the previous round's aggregate (zeros in the
    first round); the caller stores the returned vector and passes it back next round.
    """
    n, d = check_stack(x)
    if tuple(reference.shape) != (d,):
        raise ValueError(f"reference must have shape ({d},), got {tuple(reference.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    v = reference.to(dtype=x.dtype, device=x.device)
    row_sq = torch.linalg.vector_norm(x, dim=1).to(torch.float64).square()
    zero = not bool(v.any())  # the first round: the distances are the row norms, no x @ v pass
    for _ in range(iterations):
        dist = row_sq.sqrt() if zero else _distances_to(x, row_sq, v)
        scale = torch.clamp(tau / dist.clamp(min=1e-30), max=1.0)
        coef = (scale / n).to(x.dtype)
        # v + mean_i s_i (x_i - v) = (1 - mean_i s_i) v + sum_i (s_i / n) x_i: one matrix-vector product
        v = coef @ x if zero else torch.addmv(v, x.t(), coef, beta=float(1.0 - scale.sum() / n))
        zero = False
    return v


def _distances_to(x: torch.Tensor, row_sq: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 ``|x_i - v|`` from ``|x_i|^2 - 2 x_i.v + |v|^2`` (one matrix-vector product).

    Rows where that difference cancels (the expected float32 rounding error above 1e-3 of the result)
    are measured directly instead.
    """
    vv = float(torch.linalg.vector_norm(v).to(torch.float64).square())
    sq = row_sq - 2.0 * (x @ v).to(torch.float64) + vv
    cancels = sq < (_F32_UNIT * math.sqrt(x.shape[1]) / 1e-3) * (row_sq + vv)
    if bool(cancels.any()):
        rows = cancels.nonzero()[:, 0]
        exact = torch.cdist(x[rows], v[None, :], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]
        sq[rows] = exact.to(torch.float64).square()
    return sq.clamp_(min=0.0).sqrt_()


def norm_clip(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """A new (n, d) tensor whose rows are those of x scaled down to L2 norm at most ``max_norm``."""
    check_stack(x)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norms = torch.linalg.vector_norm(x, dim=1).to(torch.float64)
    scale = torch.clamp(max_norm / norms.clamp(min=1e-30), max=1.0).to(x.dtype)
    return x * scale[:, None]


def bucketing(x: torch.Tensor, s: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly permute the rows and average consecutive groups of ``s``: ``(ceil(n / s), d)``.

    The last bucket holds the remaining ``n mod s`` rows when s does not divide n. The permutation comes
    from ``generator`` (seed it for a reproducible round).
    """
    n, d = check_stack(x)
    if s < 1:
        raise ValueError(f"bucket size s must be >= 1, got {s}")
    perm = torch.randperm(n, generator=generator).to(x.device)
    buckets = math.ceil(n / s)
    bucket_of = torch.empty(n, dtype=torch.long, device=x.device)
    bucket_of[perm] = torch.arange(n, device=x.device) // s
    counts = torch.bincount(bucket_of, minlength=buckets).to(x.dtype)
    out = torch.zeros(buckets, d, dtype=x.dtype, device=x.device)
    out.index_add_(0, bucket_of, x)
    return out.div_(counts[:, None])


# --- how many Byzantine inputs each rule tolerates -------------------------------------------------------


def _half(n: int) -> int:
    """The largest f with f < n / 2."""
    return max(0, (n - 1) // 2)


def _krum_tolerance(n: int, f: int | None = None, **_: object) -> int:
    largest = max(0, (n - 3) // 2)  # the largest f with n > 2f + 2
    if f is None:
        return largest
    return f if 0 <= f <= largest else 0


def _trimmed_tolerance(n: int, trim_fraction: float | None = None, **_: object) -> int:
    if trim_fraction is None:
        raise ValueError("max_byzantine('trimmed_mean', ...) needs trim_fraction")
    return min(math.floor(trim_fraction * n), _half(n))


@dataclass(frozen=True)
class RobustRule:
    """What the aggregation registry needs to know about a rule."""

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[str, ...]
    tolerance: str  # the condition, in words, for error messages
    tolerated: Callable[..., int]


RULES: dict[str, RobustRule] = {
    "fedavg": RobustRule("fedavg", fedavg, ("weights",), "no Byzantine input (f = 0)", lambda n, **_: 0),
    "median": RobustRule("median", coordinate_median, (), "f < n/2", lambda n, **_: _half(n)),
    "trimmed_mean": RobustRule(
        "trimmed_mean", trimmed_mean, ("trim_fraction",), "f <= floor(trimFraction * n) < n/2", _trimmed_tolerance
    ),
    "krum": RobustRule("krum", krum, ("f",), "n > 2f + 2", _krum_tolerance),
    "multi_krum": RobustRule("multi_krum", multi_krum, ("f", "m"), "n > 2f + 2", _krum_tolerance),
    "geometric_median": RobustRule(
        "geometric_median", geometric_median, ("weights", "eps", "tol", "max_iter"), "f < n/2", lambda n, **_: _half(n)
    ),
    "centered_clipping": RobustRule(
        "centered_clipping",
        centered_clipping,
        ("reference", "tau", "iterations"),
        "f < n/2",
        lambda n, **_: _half(n),
    ),
}


def max_byzantine(rule: str, n: int, bucket_size: int | None = None, **params: object) -> int:
    """How many Byzantine inputs among ``n`` the rule tolerates, with its parameters.

    - fedavg: 0 (one arbitrary input moves the mean arbitrarily far);
    - median and geometric median: f < n/2 (breakdown point 1/2);
    - trimmed mean: f <= floor(trim_fraction * n) (each end trims at least the Byzantine count);
    - Krum and Multi-Krum: n > 2f + 2 (Blanchard et al. 2017, Proposition 1); with parameter ``f`` given,
      that f if it satisfies the condition, else 0;
    - centered clipping: f < n/2. Clipping around a centre is a Huber-type M-estimate of location, whose
      breakdown point is 1/2; Karimireddy et al. (2021) prove their convergence rate for a Byzantine
      fraction below a smaller constant, so this is the limit past which no guarantee is possible, not
      the one their theorem covers.
    - with bucketing (``bucket_size`` s > 1) the rule sees ceil(n/s) bucket means and each Byzantine
      input spoils at most one bucket: the tolerance is the rule's own on ceil(n/s) inputs, so the
      tolerated fraction divides by s (Karimireddy et al. 2022).
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known rules: {', '.join(RULES)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if bucket_size is not None:
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        n = math.ceil(n / bucket_size)
    return int(RULES[rule].tolerated(n, **params))


# --- nearest-neighbour mixing (a pre-step before any rule) -----------------------------------------------


def nnm(x: torch.Tensor, f: int) -> torch.Tensor:
    """Nearest-neighbour mixing (Allouah et al. 2023, "Fixing by Mixing"): a new ``(n, d)`` tensor.

    Row i becomes the mean of the ``n - f`` rows nearest to row i in Euclidean distance, itself included
    (always first, whatever ties). The neighbours come from one Gram matrix (``_gram``, re-centred where
    float32 cancellation would cost precision) and the mixing is one ``(n, n) @ (n, d)`` product: x is read
    twice, and no ``(n, n - f, d)`` gather is built. Ties between other rows go to the lower row index.
    """
    n, _ = check_stack(x)
    if not 0 <= f < n:
        raise ValueError(f"nnm needs 0 <= f < n (each row keeps n - f >= 1 neighbours); got n={n}, f={f}")
    k = n - f
    dist = pairwise_sq_distances(x)
    dist.fill_diagonal_(-1.0)  # a row is its own nearest neighbour, even among duplicates
    neighbours = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    mix = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    mix.scatter_(1, neighbours.to(x.device), 1.0 / k)
    return mix @ x


def nnm_tolerance(rule: str, n: int, f: int | None = None, **params: object) -> int:
    """How many Byzantine inputs among ``n`` the rule tolerates after NNM with parameter ``f``.

    NNM keeps the rule's tolerance (Allouah et al. 2023: an (f, kappa)-robust rule composed with NNM is
    (f, kappa')-robust, for f < n/2), so: the rule's own ``max_byzantine``, at most f < n/2,
    and at most NNM's ``f`` when it is given (each honest row mixes n - f rows: more Byzantine rows than f
    can fill a whole neighbourhood).
    """
    tol = min(max_byzantine(rule, n, None, **params), _half(n))
    return tol if f is None else min(tol, f)
