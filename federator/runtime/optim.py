"""The clients' local optimizers: torch's own SGD and Adam update functions, with their state kept here.

`torch.optim.SGD` and `torch.optim.Adam` call the functional `torch.optim.sgd.sgd` and
`torch.optim.adam.adam` (public, in their modules' `__all__`) for the arithmetic. The classes around them
also import `torch._dynamo` the first time one is built or stepped (`Optimizer.add_param_group` and
`zero_grad` are wrapped in `torch._disable_dynamo`, `step` in `_use_grad_for_differentiable`): about
1-1.7 s of CPU per worker process on 2 cores, for a compiler the runtime never uses. These classes keep
the classes' state (momentum buffers; Adam's steps and moments) and call the same functions with the
same arguments, so an update is bit-identical to the class's (a unit test compares them step by step).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch.optim.adam import adam
from torch.optim.sgd import sgd

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS = 1e-8


class LocalOptimizer(ABC):
    """Updates `params` in place from their `.grad` (parameters without a gradient are skipped)."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)

    def zero_grad(self) -> None:
        """Drop the gradients (what `Optimizer.zero_grad(set_to_none=True)` does)."""
        for p in self.params:
            p.grad = None

    def _with_grad(self) -> list[int]:
        return [i for i, p in enumerate(self.params) if p.grad is not None]

    @abstractmethod
    def step(self) -> None: ...


class SGD(LocalOptimizer):
    """`torch.optim.SGD(params, lr, momentum, weight_decay=...)`, without dampening or Nesterov."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        idx = self._with_grad()
        params = [self.params[i] for i in idx]
        grads = [p.grad for p in params if p.grad is not None]
        buffers = [self.momentum_buffers[i] for i in idx] if self.momentum != 0 else []
        sgd(params, grads, buffers, has_sparse_grad=any(g.is_sparse for g in grads), foreach=None, fused=None,
            weight_decay=self.weight_decay, momentum=self.momentum, lr=self.lr, dampening=0.0, nesterov=False,
            maximize=False)
        if self.momentum != 0:  # sgd() fills in the buffers it created on this first step
            for i, buf in zip(idx, buffers, strict=True):
                self.momentum_buffers[i] = buf


class Adam(LocalOptimizer):
    """`torch.optim.Adam(params, lr, weight_decay=...)` with its default betas and eps, without amsgrad."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float, weight_decay: float = 0.0) -> None:
        super().__init__(params)
        self.lr, self.weight_decay = lr, weight_decay
        # (step, exp_avg, exp_avg_sq) per parameter, created at its first step as torch.optim.Adam does
        self.state: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(self.params)

    def _state(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        st = self.state[i]
        if st is None:
            p = self.params[i]
            # the step lives on the CPU (not capturable, not fused), in float64 only under a float64 default
            step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            st = (torch.tensor(0.0, dtype=step_dtype, device="cpu"),
                  torch.zeros_like(p, memory_format=torch.preserve_format),
                  torch.zeros_like(p, memory_format=torch.preserve_format))
            self.state[i] = st
        return st

    @torch.no_grad()
    def step(self) -> None:
        idx = self._with_grad()
        params = [self.params[i] for i in idx]
        grads = [p.grad for p in params if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Adam does not support sparse gradients")
        states = [self._state(i) for i in idx]
        adam(params, grads, [s[1] for s in states], [s[2] for s in states], [], [s[0] for s in states],
             foreach=None, capturable=False, differentiable=False, fused=None,
             has_complex=any(torch.is_complex(p) for p in params),
             amsgrad=False, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], lr=self.lr, weight_decay=self.weight_decay,
             eps=ADAM_EPS, maximize=False)
