"""Server optimizers: FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

The post-aggregation stage: it turns the round's aggregate into the next global model. Pure; the
state it carries between rounds is explicit and checkpointed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from federator.api.models import ServerOptimizerSpec
from federator.runtime.aggregation.fedavg import check_same_layout
from federator.runtime.training import Params


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
    check_same_layout(global_params, aggregate, "server_update")
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
