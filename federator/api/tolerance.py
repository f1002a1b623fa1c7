"""How many Byzantine updates each aggregation rule tolerates, and the spec check built on it.

Pure Python (no torch), so `federator validate`, the CRD and the operator can use it. The numbers are the
rules' published breakdown points; `federator.runtime.robust.max_byzantine` states the same and a test
keeps the two equal.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from federator.api.models import AggregationSpec, FederationSpec

ROBUST_RULES = ("median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "centered_clipping")


def rule_tolerance(rule: str, n: int, trim_fraction: float = 0.0, f: int | None = None,
                   bucket_size: int = 1, nnm: bool = False, nnm_f: int | None = None) -> int:
    """The largest number of Byzantine updates among `n` that `rule` withstands.

    fedavg 0; median, geometric median, centered clipping f < n/2; trimmed mean floor(trim * n) (below
    n/2); Krum and Multi-Krum n > 2f + 2 (Blanchard et al. 2017), and with their `f` set, that f if it
    meets the condition, else 0. With bucketing (size s) the rule sees ceil(n/s) bucket means and each
    Byzantine update spoils one bucket: the tolerance is the rule's own on ceil(n/s) inputs. Nearest-
    neighbour mixing keeps the rule's tolerance (Allouah et al. 2023; NNM needs f < n/2, which every rule's
    limit already is), capped at NNM's own `f` when it is set.
    """
    if n < 1:
        return 0
    if nnm:
        tol = rule_tolerance(rule, n, trim_fraction, f, bucket_size)
        return tol if nnm_f is None else min(tol, nnm_f)
    if bucket_size > 1:
        n = math.ceil(n / bucket_size)
    half = max(0, (n - 1) // 2)
    if rule == "fedavg":
        return 0
    if rule in ("median", "geometric_median", "centered_clipping"):
        return half
    if rule == "trimmed_mean":
        return min(math.floor(trim_fraction * n), half)
    if rule in ("krum", "multi_krum"):
        largest = max(0, (n - 3) // 2)
        if f is None:
            return largest
        return f if 0 <= f <= largest else 0
    raise ValueError(f"aggregation.rule: unknown rule {rule!r}")


def expected_byzantine(fraction: float, n: int) -> int:
    """Byzantine updates to plan for: the expected fraction of `n`, rounded up."""
    return max(0, math.ceil(fraction * n - 1e-9))


def tolerated(agg: AggregationSpec, n: int) -> int:
    return rule_tolerance(agg.rule, n, agg.trimFraction, agg.f, agg.bucketing.size if agg.bucketing else 1,
                          agg.nnm is not None, agg.nnm.f if agg.nnm else None)


def tolerance_problem(spec: FederationSpec) -> str | None:
    """None when the rule withstands byzantine.expectedFraction of clients.minPerRound; else a message naming
    the limit and a rule or setting that would work."""
    n = spec.clients.min_per_round
    want = expected_byzantine(spec.byzantine.expectedFraction, n)
    agg = spec.aggregation
    have = tolerated(agg, n)
    if want <= have:
        return None
    s = agg.bucketing.size if agg.bucketing else 1
    hints = []
    for rule in ROBUST_RULES:
        if rule == "trimmed_mean":
            nb = math.ceil(n / s)
            need = want / nb
            if want <= max(0, (nb - 1) // 2):
                hints.append(f"trimmed_mean with trimFraction >= {math.ceil(need * 100 - 1e-6) / 100:g}")
            continue
        tol = rule_tolerance(rule, n, bucket_size=s)
        if tol >= want:
            hints.append(f"{rule} (tolerates {tol})")
    if s > 1:
        hints.append("a smaller aggregation.bucketing.size")
    if agg.f is not None and agg.rule in ("krum", "multi_krum") and agg.f < want <= rule_tolerance(agg.rule, n):
        hints.insert(0, f"aggregation.f >= {want}")
    if agg.nnm is not None and agg.nnm.f is not None and agg.nnm.f < want <= rule_tolerance(
            agg.rule, n, agg.trimFraction, agg.f, s):
        # the rule would do; NNM's f caps it: only raising f (or leaving it to default to the expected count) helps
        hints = [f"aggregation.nnm.f >= {want}", "aggregation.nnm without f (it defaults to the expected count)"]
    fix = "; use " + " or ".join(hints) if hints else "; raise clients.minPerRound or lower byzantine.expectedFraction"
    return (
        f"byzantine.expectedFraction={spec.byzantine.expectedFraction:g} of clients.minPerRound={n} is {want} "
        f"Byzantine updates, but aggregation.rule={agg.rule} tolerates at most {have} of {n}{fix}"
    )
