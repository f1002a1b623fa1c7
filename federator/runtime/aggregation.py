"""Aggregation kernels and server optimizers; pure functions, inputs are never modified.

FedAvg (McMahan et al. 2017) is a sample-weighted mean of the client models. Floating tensors are
accumulated in float64 (complex128 for complex ones) and cast back to their dtype; other tensors
(e.g. BatchNorm's ``num_batches_tracked``) are taken from the first update. The server optimizers
are FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from federator.api.models import ServerOptimizerSpec
from federator.runtime.training import Params


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.complex128 if t.is_complex() else torch.float64


def _check_same_layout(
    reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str
) -> None:
    if reference.keys() != other.keys():
        missing = sorted(set(reference) - set(other))[:5]
        extra = sorted(set(other) - set(reference))[:5]
        raise ValueError(f"{what}: keys differ (missing {missing}, unexpected {extra})")
    for k, ref in reference.items():
        if tuple(other[k].shape) != tuple(ref.shape):
            raise ValueError(
                f"{what}: tensor {k!r} has shape {tuple(other[k].shape)}, expected {tuple(ref.shape)}"
            )


class FedAvgAccumulator:
    """Streaming weighted mean: O(model) memory however many updates are added.

    Gives exactly the same result as :func:`weighted_average` over the same updates in the same order.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._first: Params = {}
        self._count = 0
        self._total = 0.0
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._scratch = torch.empty(0, dtype=torch.float64)

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total

    def add(self, params: Mapping[str, torch.Tensor], weight: float) -> None:
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        if self._count == 0:
            layout = {k: (tuple(t.shape), t.dtype) for k, t in params.items()}
            if layout != self._layout or any(self._sums[k].device != t.device for k, t in params.items()
                                             if k in self._sums):
                self._sums = {k: torch.empty(t.shape, dtype=_acc_dtype(t), device=t.device)
                              for k, t in params.items() if _is_float(t)}
            self._first = {k: t.detach().clone() for k, t in params.items() if not _is_float(t)}
            self._layout = layout
            for k, acc in self._sums.items():  # the first update initialises the sums: no zeroing pass
                acc.copy_(params[k].detach())
                acc.mul_(w)
        else:
            self._check(params)
            for k, acc in self._sums.items():
                acc.add_(self._widened(params[k].detach(), acc), alpha=w)
        self._count += 1
        self._total += w

    def reset(self) -> None:
        """Start a new mean, keeping the buffers: a server reuses one accumulator round after round, so
        its first update of a round does not pay for fresh memory (page faults cost more than the sum)."""
        self._count = 0
        self._total = 0.0
        self._first = {}

    def _widened(self, t: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """`t` in the accumulator's dtype, through one reused buffer: torch's own conversion allocates
        and is about twice as slow on one thread (this runs once per update on the server)."""
        if t.dtype == acc.dtype or acc.dtype != torch.float64 or t.device.type != "cpu":
            return t.to(acc.dtype)
        if self._scratch.numel() < t.numel():
            self._scratch = torch.empty(t.numel(), dtype=torch.float64)
        out = self._scratch[: t.numel()].view(t.shape)
        out.copy_(t)
        return out

    def _check(self, params: Mapping[str, torch.Tensor]) -> None:
        if params.keys() != self._layout.keys():
            missing = sorted(set(self._layout) - set(params))[:5]
            extra = sorted(set(params) - set(self._layout))[:5]
            raise ValueError(f"update {self._count}: keys differ (missing {missing}, unexpected {extra})")
        for k, (shape, _dtype) in self._layout.items():
            if tuple(params[k].shape) != shape:
                raise ValueError(
                    f"update {self._count}: tensor {k!r} has shape {tuple(params[k].shape)}, expected {shape}"
                )

    def result(self) -> Params:
        """The weighted mean so far (the accumulator can keep going afterwards)."""
        if self._count == 0:
            raise ValueError("no updates to aggregate")
        if not self._total > 0:
            raise ValueError(f"total weight must be > 0, got {self._total}")
        out: Params = {}
        for k, (_shape, dtype) in self._layout.items():
            if k in self._sums:
                out[k] = (self._sums[k] / self._total).to(dtype)
            else:
                out[k] = self._first[k].clone()
        return out


def weighted_average(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Params:
    """FedAvg: sum_i w_i * u_i / sum_i w_i per tensor, in the tensor's own dtype."""
    if not updates:
        raise ValueError("no updates to aggregate")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    acc = FedAvgAccumulator()
    for u, w in zip(updates, weights, strict=True):
        acc.add(u, w)
    return acc.result()


# ---------------------------------------------------------------------------------- server optimizer


@dataclass
class ServerOptimizerState:
    """Everything a server optimizer carries between rounds (checkpointed with the model)."""

    step: int = 0
    m: Params = field(default_factory=dict)
    v: Params = field(default_factory=dict)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; half precision is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def server_update(
    global_params: Mapping[str, torch.Tensor],
    aggregate: Mapping[str, torch.Tensor],
    spec: ServerOptimizerSpec,
    state: ServerOptimizerState,
) -> tuple[Params, ServerOptimizerState]:
    """Apply the server optimizer to the pseudo-gradient ``aggregate - global``.

    Returns the new global parameters and a new state; neither input nor ``state`` is modified.
    ``sgd`` with learningRate 1 and momentum 0 returns ``aggregate`` exactly (plain FedAvg).
    For adam/yogi/adagrad, ``v`` starts at tau^2 as in the paper and there is no bias correction.
    """
    _check_same_layout(global_params, aggregate, "server_update")
    lr = spec.learningRate
    new_params: Params = {}
    new_m: Params = {}
    new_v: Params = {}
    plain = spec.name == "sgd" and lr == 1.0 and spec.momentum == 0.0
    for k, g in global_params.items():
        a = aggregate[k]
        if not g.is_floating_point() or plain:
            new_params[k] = a.detach().clone()
            continue
        dt = _work_dtype(g)
        g_w = g.detach().to(dt)
        delta = a.detach().to(dt) - g_w
        prev_m = _state_tensor(state.m, k, delta, "m")
        if spec.name == "sgd":
            if spec.momentum > 0:
                buf = delta if prev_m is None else prev_m * spec.momentum + delta
                new_m[k] = buf
            else:
                buf = delta
            new_params[k] = (g_w + lr * buf).to(g.dtype)
            continue
        m = (1 - spec.beta1) * delta if prev_m is None else spec.beta1 * prev_m + (1 - spec.beta1) * delta
        prev_v = _state_tensor(state.v, k, delta, "v")
        v0 = torch.full_like(delta, spec.tau**2) if prev_v is None else prev_v
        d2 = delta * delta
        if spec.name == "adam":
            v = spec.beta2 * v0 + (1 - spec.beta2) * d2
        elif spec.name == "yogi":
            v = v0 - (1 - spec.beta2) * d2 * torch.sign(v0 - d2)
        elif spec.name == "adagrad":
            v = v0 + d2
        else:  # pragma: no cover - the API model restricts the name
            raise ValueError(f"aggregation.serverOptimizer.name: unknown optimizer {spec.name!r}")
        new_m[k], new_v[k] = m, v
        new_params[k] = (g_w + lr * m / (torch.sqrt(v) + spec.tau)).to(g.dtype)
    return new_params, ServerOptimizerState(step=state.step + 1, m=new_m, v=new_v)


def _state_tensor(store: Params, key: str, like: torch.Tensor, name: str) -> torch.Tensor | None:
    t = store.get(key)
    if t is None:
        return None
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(
            f"server optimizer state {name}[{key!r}] has shape {tuple(t.shape)} but the model has "
            f"{tuple(like.shape)}: the model changed since the checkpoint; delete the checkpoint to restart"
        )
    return t.detach().to(device=like.device, dtype=like.dtype)


def state_to_dict(state: ServerOptimizerState) -> dict[str, Any]:
    """Plain data (ints and tensors) that ``torch.load(weights_only=True)`` can read back."""
    return {
        "step": int(state.step),
        "m": {k: t.detach().cpu().clone() for k, t in state.m.items()},
        "v": {k: t.detach().cpu().clone() for k, t in state.v.items()},
    }


def state_from_dict(d: Mapping[str, Any]) -> ServerOptimizerState:
    step = d.get("step", 0)
    m = d.get("m", {})
    v = d.get("v", {})
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"server optimizer state: step must be an int >= 0, got {step!r}")
    for name, store in (("m", m), ("v", v)):
        if not isinstance(store, Mapping) or not all(
            isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in store.items()
        ):
            raise ValueError(f"server optimizer state: {name} must map names to tensors")
    return ServerOptimizerState(
        step=step,
        m={k: t.clone() for k, t in m.items()},
        v={k: t.clone() for k, t in v.items()},
    )
