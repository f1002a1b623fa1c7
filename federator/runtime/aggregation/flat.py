"""A model's floating tensors as one float32 vector, and back: the row format robust rules work on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from federator.runtime.training import Params


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


@dataclass(frozen=True)
class FlatLayout:
    """Where each floating tensor of a model lives in the flat vector; other tensors are left out."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> FlatLayout:
        keys, shapes, dtypes, offsets = [], [], [], []
        at = 0
        for k, t in params.items():
            if not _is_float(t):
                continue
            keys.append(k)
            shapes.append(tuple(t.shape))
            dtypes.append(t.dtype)
            offsets.append(at)
            at += t.numel()
        return cls(tuple(keys), tuple(shapes), tuple(dtypes), tuple(offsets), at)

    def flatten_into(self, params: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Copy `params`' floating tensors into `out` ((size,) float32); returns `out`."""
        for k, shape, at in zip(self.keys, self.shapes, self.offsets, strict=True):
            t = params[k].detach()
            n = t.numel()
            out[at:at + n].view(shape).copy_(t)
        return out

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.flatten_into(params, torch.empty(self.size, dtype=torch.float32))

    def unflatten(self, vec: torch.Tensor, others: Mapping[str, torch.Tensor], order: Mapping[str, torch.Tensor]
                  ) -> Params:
        """Params in the key order of `order`: floating tensors from `vec` (in their own dtype, copied), the
        others cloned from `others`."""
        where = {k: (shape, dtype, at) for k, shape, dtype, at in
                 zip(self.keys, self.shapes, self.dtypes, self.offsets, strict=True)}
        out: Params = {}
        for k in order:
            if k in where:
                shape, dtype, at = where[k]
                n = 1
                for s in shape:
                    n *= s
                out[k] = vec[at:at + n].view(shape).to(dtype=dtype, copy=True)
            else:
                out[k] = others[k].detach().clone()
        return out
