"""The rule registry: `aggregation.rule` -> the kernel that turns a round's update rows into one update.

Adding a rule is one kernel in `federator.runtime.robust`, one entry here, its tolerance in
`federator.api.tolerance`, and their tests. Kernels are pure: they read the (n, d) rows and the context and
return a new (d,) update; a rule's state across rounds (centered clipping's reference) comes in through the
context and its result is the next round's state, kept by the caller and checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from federator.api.models import AggregationSpec
from federator.runtime import robust


@dataclass(frozen=True)
class RuleContext:
    """What a kernel may use besides the rows."""

    spec: AggregationSpec
    byzantine: int  # updates assumed Byzantine among the rows (Krum's f)
    weights: torch.Tensor  # (n,) sample counts, float64
    reference: torch.Tensor | None  # centered clipping: the previous round's aggregate update (zeros at first)


Kernel = Callable[[torch.Tensor, RuleContext], torch.Tensor]


@dataclass(frozen=True)
class Rule:
    name: str
    kernel: Kernel
    streaming: bool = False  # True: updates are summed as they arrive and never buffered (O(model) memory)
    keeps_reference: bool = False  # True: the result is also next round's `reference`


def _krum_f(x: torch.Tensor, ctx: RuleContext) -> int:
    """Krum needs n - f - 2 >= 1 neighbours; a round smaller than planned assumes what it can."""
    n = x.shape[0]
    f = ctx.spec.f if ctx.spec.f is not None else ctx.byzantine
    return max(0, min(f, n - 3))


KRUM_MIN_UPDATES = 3  # Krum scores need n - f - 2 >= 1 neighbours


def _krum(x: torch.Tensor, ctx: RuleContext) -> torch.Tensor:
    if x.shape[0] < KRUM_MIN_UPDATES:  # one or two updates: nothing to choose between, so their mean
        return robust.fedavg(x, ctx.weights)
    return robust.krum(x, _krum_f(x, ctx))


def _multi_krum(x: torch.Tensor, ctx: RuleContext) -> torch.Tensor:
    if x.shape[0] < KRUM_MIN_UPDATES:
        return robust.fedavg(x, ctx.weights)
    f = _krum_f(x, ctx)
    m = ctx.spec.m if ctx.spec.m is not None else x.shape[0] - f
    return robust.multi_krum(x, f, max(1, min(m, x.shape[0])))


def _centered_clipping(x: torch.Tensor, ctx: RuleContext) -> torch.Tensor:
    ref = ctx.reference if ctx.reference is not None else torch.zeros(x.shape[1], dtype=x.dtype)
    return robust.centered_clipping(x, ref, ctx.spec.tau, ctx.spec.iterations)


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("fedavg", lambda x, ctx: robust.fedavg(x, ctx.weights), streaming=True),
    Rule("median", lambda x, ctx: robust.coordinate_median(x)),
    Rule("trimmed_mean", lambda x, ctx: robust.trimmed_mean(x, ctx.spec.trimFraction)),
    Rule("krum", _krum),
    Rule("multi_krum", _multi_krum),
    Rule("geometric_median", lambda x, ctx: robust.geometric_median(
        x, tol=ctx.spec.tolerance, max_iter=ctx.spec.maxIterations)),
    Rule("centered_clipping", _centered_clipping, keeps_reference=True),
)}


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"aggregation.rule: unknown rule {name!r}; choose one of {sorted(RULES)}") from None
