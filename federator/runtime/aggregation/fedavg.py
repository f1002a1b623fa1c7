"""Streaming FedAvg (McMahan et al. 2017): a sample-weighted mean of the client models; inputs are never modified.

Floating tensors are accumulated in float64 (complex128 for complex ones) and cast back to their dtype;
other tensors (e.g. BatchNorm's ``num_batches_tracked``) are taken from the first update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from federator.runtime.training import Params


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.complex128 if t.is_complex() else torch.float64


def check_same_layout(
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


_BLOCK = 1 << 17  # elements: 1 MiB of float64 per block, small enough to stay in L2 between its two ops


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
                self._fold(acc, params[k].detach(), w, first=True)
        else:
            self._check(params)
            for k, acc in self._sums.items():
                self._fold(acc, params[k].detach(), w, first=False)
        self._count += 1
        self._total += w

    def reset(self) -> None:
        """Start a new mean, keeping the buffers: a server reuses one accumulator round after round, so
        its first update of a round does not pay for fresh memory (page faults cost more than the sum)."""
        self._count = 0
        self._total = 0.0
        self._first = {}

    def _fold(self, acc: torch.Tensor, t: torch.Tensor, w: float, first: bool) -> None:
        """``acc = w * t`` (first) or ``acc += w * t``, in the accumulator's dtype, in one pass over memory.

        Torch widens a float32 operand of a float64 op into a fresh temporary (a second pass and page
        faults), so a float32 tensor goes through in blocks of ``_BLOCK`` elements: each is widened into a
        cache-resident scratch (or straight into ``acc``) and folded in while still in cache. The arithmetic
        per element is the same as the whole-tensor ops (block bounds are a multiple of any vector width).
        """
        if t.dtype == acc.dtype or acc.dtype != torch.float64 or t.device.type != "cpu" or not t.is_contiguous():
            if first:
                acc.copy_(t)
                acc.mul_(w)
            else:
                acc.add_(t if t.dtype == acc.dtype else t.to(acc.dtype), alpha=w)
            return
        a, x = acc.view(-1), t.view(-1)
        n = x.numel()
        if not first and self._scratch.numel() < min(n, _BLOCK):
            self._scratch = torch.empty(_BLOCK, dtype=torch.float64)
        for start in range(0, n, _BLOCK):
            stop = min(n, start + _BLOCK)
            dst = a[start:stop]
            if first:
                dst.copy_(x[start:stop])
                dst.mul_(w)
            else:
                wide = self._scratch[: stop - start]
                wide.copy_(x[start:stop])
                dst.add_(wide, alpha=w)

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
                out[k] = self._mean(self._sums[k], dtype)
            else:
                out[k] = self._first[k].clone()
        return out


    def _mean(self, acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(acc / total).to(dtype)`` without the float64 temporary of the whole tensor (a fresh 8 bytes per
        parameter every round, page faults included): divided block by block through the scratch."""
        if acc.dtype != torch.float64 or dtype == torch.float64 or acc.device.type != "cpu":
            return (acc / self._total).to(dtype)
        out = torch.empty(acc.shape, dtype=dtype)
        a, o = acc.view(-1), out.view(-1)
        n = a.numel()
        if self._scratch.numel() < min(n, _BLOCK):
            self._scratch = torch.empty(_BLOCK, dtype=torch.float64)
        for start in range(0, n, _BLOCK):
            stop = min(n, start + _BLOCK)
            quotient = self._scratch[: stop - start]
            torch.div(a[start:stop], self._total, out=quotient)
            o[start:stop].copy_(quotient)
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
