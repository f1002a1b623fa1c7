"""Attack simulation for experiments (`byzantine.attack`): who attacks, and the server-side stage that
rewrites the attackers' updates.

This is a simulation: sign flip, scaled, Gaussian, ALIE, IPM and replay are applied by the server to the
designated attackers' updates, before scoring, because ALIE and IPM need the round's honest updates (as in
Baruch et al. 2019 and Xie et al. 2020, where the attacker is omniscient). Label flip poisons the
attacker's local data on the client instead. The attack functions themselves live in
`federator.runtime.byzantine`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from federator.api.models import AttackSpec, FederationSpec
from federator.runtime import byzantine
from federator.runtime.data import ArrayDataset

UPDATE_ATTACKS = ("sign_flip", "scaled", "gaussian", "alie", "ipm", "replay")
DEFAULTS = {"scale": 1.0, "factor": 10.0, "std": 1.0, "epsilon": 0.5}


def choose_attackers(spec: FederationSpec) -> tuple[str, ...]:
    """The simulated clients that attack: `count` (or `fraction` of clients.count, rounded down) chosen
    with the attack's seed. Empty without an attack."""
    attack = spec.byzantine.attack
    if attack is None:
        return ()
    n = spec.clients.count
    k = attack.count if attack.count is not None else math.floor((attack.fraction or 0.0) * n + 1e-9)
    k = min(k, n)
    rng = np.random.default_rng([attack.seed, 0x0A77AC])
    picked = sorted(int(i) for i in rng.choice(n, size=k, replace=False))
    return tuple(f"sim-{i}" for i in picked)


def local_data(spec: FederationSpec, client_id: str, data: ArrayDataset) -> ArrayDataset:
    """A simulated client's training data as it trains on it: with labels flipped when it is a label-flip
    attacker, else `data` itself."""
    attack = spec.byzantine.attack
    if attack is None or attack.type != "label_flip" or client_id not in choose_attackers(spec):
        return data
    flipped = byzantine.label_flip(torch.from_numpy(np.ascontiguousarray(data.y)), data.num_classes)
    return ArrayDataset(data.x, flipped.numpy(), data.num_classes)


def describe(spec: FederationSpec, attackers: Sequence[str]) -> str:
    """One line for the banner and metrics.json."""
    attack = spec.byzantine.attack
    if attack is None or not attackers:
        return ""
    params = {**{k: v for k, v in DEFAULTS.items() if k in _PARAM_OF.get(attack.type, ())}, **attack.parameters}
    shown = ", ".join(f"{k}={v:g}" for k, v in sorted(params.items()))
    where = "poisoned local labels (client side)" if attack.type == "label_flip" else \
        "updates rewritten by the server (simulation)"
    return (f"ATTACK SIMULATION: {len(attackers)} of {spec.clients.count} clients attack with {attack.type}"
            f"{f' ({shown})' if shown else ''}, {where}: {', '.join(attackers)}")


_PARAM_OF = {"sign_flip": ("scale",), "scaled": ("factor",), "gaussian": ("std",), "ipm": ("epsilon",), "alie": ("z",)}


def attack_banner(spec: FederationSpec) -> str:
    """What `federator run` prints before an attack experiment starts."""
    line = describe(spec, choose_attackers(spec)) or "ATTACK SIMULATION: byzantine.attack chooses no client"
    bar = "!" * min(100, max(40, len(line)))
    return f"{bar}\n{line}\n{bar}"


def _param(attack: AttackSpec, name: str) -> float:
    return float(attack.parameters.get(name, DEFAULTS[name]))


def attack_rows(
    x: torch.Tensor,
    clients: Sequence[str],
    attackers: frozenset[str],
    attack: AttackSpec,
    replay: Mapping[str, torch.Tensor],
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The round's rows with the attackers' rows rewritten (a new tensor; `x` is not modified), and the
    replay store for the next round (replaying attackers behave honestly once, then resend that update)."""
    bad = [i for i, c in enumerate(clients) if c in attackers]
    new_replay = dict(replay)
    if not bad or attack.type not in UPDATE_ATTACKS:
        return x, new_replay
    good = [i for i in range(len(clients)) if i not in set(bad)]
    honest = x[good]
    out = x.clone()
    if attack.type in ("alie", "ipm"):
        if len(good) < 2:  # nothing to imitate: they send their own update
            return x, new_replay
        if attack.type == "ipm":
            v = byzantine.ipm(honest, _param(attack, "epsilon"))
        elif "z" in attack.parameters:  # a chosen z instead of the paper's z_max (a stronger or weaker ALIE)
            v = honest.mean(dim=0) - float(attack.parameters["z"]) * honest.std(dim=0, correction=1)
        elif math.floor(len(clients) / 2 + 1) - len(bad) > 0:
            v = byzantine.alie(honest, len(clients), len(bad))
        else:  # attackers are a majority of this round: the paper's z_max is undefined; z = 1
            v = honest.mean(dim=0) - honest.std(dim=0, correction=1)
        out[bad] = v.to(out.dtype)
        return out, new_replay
    for i in bad:
        u = x[i]
        if attack.type == "sign_flip":
            out[i] = byzantine.sign_flip(u, _param(attack, "scale"))
        elif attack.type == "scaled":
            out[i] = byzantine.scaled(u, _param(attack, "factor"))
        elif attack.type == "gaussian":
            out[i] = byzantine.gaussian(u, _param(attack, "std"), generator)
        else:  # replay
            prev = replay.get(clients[i])
            if prev is None or prev.shape != u.shape:
                new_replay[clients[i]] = u.clone()
            else:
                out[i] = byzantine.replay(prev)
    return out, new_replay
