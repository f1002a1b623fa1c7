"""Attacks for experiments (`byzantine.attack`): who attacks, what an attacking client does to the update it
sends, and the server-side simulation of the two omniscient attacks.

- sign flip, scaled, Gaussian and replay are done by the attacking client itself (`ClientAttack`, called by
  the worker on the model it trained, and by the in-process experiment runner in its place): the attacked
  update crosses gRPC and every server-side check like a real malicious client's;
- label flip poisons the attacking client's local data (`local_data`);
- ALIE (Baruch et al. 2019) and IPM (Xie et al. 2020) need the round's honest updates: their attackers are
  omniscient, as in the papers, so the server simulates them on the buffered round (`attack_rows`).

The attack functions themselves live in `federator.runtime.byzantine`.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from federator.api.buffer import SERVER_ATTACKS
from federator.api.models import AttackSpec, FederationSpec
from federator.runtime import byzantine
from federator.runtime.aggregation.flat import FlatLayout
from federator.runtime.data import ArrayDataset
from federator.runtime.training import Params

CLIENT_ATTACKS = ("sign_flip", "scaled", "gaussian", "replay")  # done by the attacking client to its update
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
    where = {"label_flip": "poisoned local labels (client side)",
             **{a: "updates rewritten by the attacking clients before they send them (client side)"
                for a in CLIENT_ATTACKS}}.get(attack.type, "updates rewritten by the server from the round's "
                                                           "honest updates (simulation of an omniscient attacker)")
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


def attack_rows(x: torch.Tensor, clients: Sequence[str], attackers: frozenset[str], attack: AttackSpec
                ) -> torch.Tensor:
    """The round's rows with the attackers' rows replaced by the ALIE or IPM vector computed from the honest
    rows (a new tensor; `x` is not modified). Other attack types happen on the clients: `x` comes back as is."""
    bad = [i for i, c in enumerate(clients) if c in attackers]
    if not bad or attack.type not in SERVER_ATTACKS:
        return x
    good = [i for i in range(len(clients)) if i not in set(bad)]
    if len(good) < 2:  # nothing to imitate: they send their own update
        return x
    honest = x[good]
    if attack.type == "ipm":
        v = byzantine.ipm(honest, _param(attack, "epsilon"))
    elif "z" in attack.parameters:  # a chosen z instead of the paper's z_max (a stronger or weaker ALIE)
        v = honest.mean(dim=0) - float(attack.parameters["z"]) * honest.std(dim=0, correction=1)
    elif math.floor(len(clients) / 2 + 1) - len(bad) > 0:
        v = byzantine.alie(honest, len(clients), len(bad))
    else:  # attackers are a majority of this round: the paper's z_max is undefined; z = 1
        v = honest.mean(dim=0) - honest.std(dim=0, correction=1)
    out = x.clone()
    out[bad] = v.to(out.dtype)
    return out


# --------------------------------------------------------------------------- on the attacking client


class ReplayMemory:
    """The update each replaying attacker sent first (float32, its difference to the model it trained from).

    It belongs to the client, not to a worker: with a folder (`federator run` gives its workers one,
    FEDERATOR_RESIDUAL_DIR, emptied by a run without --resume) each client's is one .npy file, so whichever
    worker trains the client next replays it, across worker and server restarts. Without one it lives in the
    process's memory (the in-process experiment runner; a cluster without shared storage, where a client
    whose first update another worker holds sends an honest update once more and is remembered there).
    """

    def __init__(self, directory: Path | None = None, federation: str = "") -> None:
        self.directory = directory
        self.federation = federation
        self._memory: dict[str, np.ndarray] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: str) -> Path:
        assert self.directory is not None
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.federation}--replay--{client_id}")
        return self.directory / f"{name}.npy"

    def get(self, client_id: str, size: int) -> np.ndarray | None:
        """The client's remembered update, or None when there is none of this size."""
        if self.directory is None:
            found = self._memory.get(client_id)
        else:
            try:
                found = np.load(self._path(client_id), allow_pickle=False)
            except (OSError, ValueError):
                found = None
        return found if found is not None and found.shape == (size,) and found.dtype == np.float32 else None

    def put(self, client_id: str, update: np.ndarray) -> None:
        update = np.ascontiguousarray(update, dtype=np.float32)
        if self.directory is None:
            self._memory[client_id] = update.copy()
            return
        path = self._path(client_id)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        with open(tmp, "wb") as f:
            np.save(f, update, allow_pickle=False)
        os.replace(tmp, path)


class ClientAttack:
    """What an attacking simulated client does to the model it trained before sending it, for the attacks
    that need nothing but its own update (`CLIENT_ATTACKS`). Every other client, and every other attack,
    sends what it trained: `apply` returns `trained` itself."""

    def __init__(self, spec: FederationSpec, directory: Path | None = None, federation: str = "") -> None:
        attack = spec.byzantine.attack
        self.attack = attack if attack is not None and attack.type in CLIENT_ATTACKS else None
        self.attackers = frozenset(choose_attackers(spec)) if self.attack is not None else frozenset()
        self.memory = ReplayMemory(directory, federation) if self.attack is not None and \
            self.attack.type == "replay" else None

    def apply(self, client_id: str, rnd: int, trained: Params, base: Params) -> Params:
        """The model the client sends for round `rnd`: `base` (the global model it trained from) plus its
        attacked update (trained - base); `trained` itself when the client does not attack this way."""
        if self.attack is None or client_id not in self.attackers:
            return trained
        layout = FlatLayout.of(base)
        start = layout.flatten(base)
        update = layout.flatten(trained) - start
        return layout.unflatten(start + self.attacked(client_id, rnd, update), trained, trained)

    def attacked(self, client_id: str, rnd: int, update: torch.Tensor) -> torch.Tensor:
        """The attacker's update in place of its honest `update` (a (d,) float32 vector, not modified)."""
        attack = self.attack
        assert attack is not None
        if attack.type == "sign_flip":
            return byzantine.sign_flip(update, _param(attack, "scale"))
        if attack.type == "scaled":
            return byzantine.scaled(update, _param(attack, "factor"))
        if attack.type == "gaussian":  # seeded by the attack, the round and the client: any worker, same noise
            gen = torch.Generator().manual_seed(zlib.crc32(f"{attack.seed}:{rnd}:{client_id}".encode()))
            return byzantine.gaussian(update, _param(attack, "std"), gen)
        # replay: honest once, remembered; that first update is sent again in every later round
        assert self.memory is not None
        before = self.memory.get(client_id, update.numel())
        if before is None:
            self.memory.put(client_id, update.numpy())
            return update
        return byzantine.replay(torch.from_numpy(before))
