"""Byzantine detection scores, client reputation and attack simulators; pure functions.

Scores are anomaly scores, higher meaning more suspicious, one per row of the stacked updates
``x`` of shape ``(n, d)``; inputs are never modified. The reputation is an explicit, JSON-able value
that the server keeps in its checkpoint. The attacks exist for experiments only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from federator.runtime import robust

# Scales the median absolute deviation to the standard deviation for normal data (1 / Phi^-1(3/4)).
MAD_TO_STD = 1.4826

SCORE_METHODS = ("norm", "cosine", "krum")


def robust_zscores(values: torch.Tensor) -> torch.Tensor:
    """Signed robust z-scores ``(v - median) / (1.4826 * MAD)`` in float64 (Iglewicz and Hoaglin 1993).

    When more than half the values are equal the MAD is 0: values equal to the median score 0 and any
    other value scores as if the MAD were 1e-12 of the median's magnitude (a huge, finite score).
    """
    v = values.to(torch.float64).reshape(-1)
    if v.numel() == 0:
        raise ValueError("robust_zscores needs at least one value")
    med = v.median() if v.numel() % 2 else v.sort().values[v.numel() // 2 - 1 : v.numel() // 2 + 1].mean()
    dev = (v - med).abs()
    mad = dev.median() if v.numel() % 2 else dev.sort().values[v.numel() // 2 - 1 : v.numel() // 2 + 1].mean()
    floor = 1e-12 * max(float(med.abs()), 1e-30)
    return (v - med) / (MAD_TO_STD * max(float(mad), floor))


def norm_zscores(x: torch.Tensor) -> torch.Tensor:
    """Signed robust z-score of each row's L2 norm (median and MAD over the rows), float64 ``(n,)``."""
    robust.check_stack(x)
    return robust_zscores(torch.linalg.vector_norm(x, dim=1, dtype=torch.float64))


def cosine_distances(x: torch.Tensor, aggregate: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_i, aggregate)`` per row, in [0, 2], float64 ``(n,)``; a zero row or aggregate gives 1."""
    _, d = robust.check_stack(x)
    if tuple(aggregate.shape) != (d,):
        raise ValueError(f"aggregate must have shape ({d},), got {tuple(aggregate.shape)}")
    a = aggregate.to(dtype=x.dtype, device=x.device)
    dots = (x @ a).to(torch.float64)
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64) * torch.linalg.vector_norm(a, dtype=torch.float64)
    cos = torch.where(norms > 0, dots / norms.clamp(min=1e-300), torch.zeros_like(dots))
    return (1.0 - cos).clamp_(0.0, 2.0)


def krum_score_ratios(x: torch.Tensor, f: int) -> torch.Tensor:
    """Each row's Krum score over the median Krum score, float64 ``(n,)``: about 1 for typical rows.

    Dividing by the median makes one threshold fit any update scale.
    """
    scores = robust.krum_scores(x, f)
    # When most rows coincide the median is 0: other rows then score huge but finite (JSON-able) values.
    return scores / max(float(scores.median()), 1e-12 * float(scores.max()), 1e-300)


def score_updates(x: torch.Tensor, method: str, aggregate: torch.Tensor | None = None, f: int = 0) -> torch.Tensor:
    """Anomaly score per row, higher is more suspicious, float64 ``(n,)``.

    - ``norm``: absolute robust z-score of the row norms (a threshold of 3.5 is the usual choice);
    - ``cosine``: cosine distance to ``aggregate`` (the round's robust aggregate; the coordinate-wise
      median of ``x`` when not given), in [0, 2];
    - ``krum``: Krum score with parameter ``f`` over the median Krum score.
    """
    if method == "norm":
        return norm_zscores(x).abs()
    if method == "cosine":
        return cosine_distances(x, robust.coordinate_median(x) if aggregate is None else aggregate)
    if method == "krum":
        return krum_score_ratios(x, f)
    raise ValueError(f"unknown detection method {method!r}; use one of {', '.join(SCORE_METHODS)}")


# --- reputation -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientReputation:
    """One client's record: ``score`` is the flag count decayed by ``decay`` per round since ``last_round``."""

    score: float = 0.0
    flags: tuple[bool, ...] = ()  # the client's last w flags, oldest first (rounds it took part in)
    quarantined_from: int | None = None  # the first round the client sits out, if ever quarantined
    quarantined_until: int | None = None  # the last one
    last_round: int | None = None


@dataclass(frozen=True)
class ReputationState:
    """Reputation of every client seen so far, keyed by client name (silo) or partition (simulated)."""

    clients: Mapping[str, ClientReputation] = field(default_factory=dict)
    round: int | None = None  # the last round folded in

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able types, for the checkpoint."""
        return {
            "version": 1,
            "round": self.round,
            "clients": {
                name: {
                    "score": c.score,
                    "flags": list(c.flags),
                    "quarantinedFrom": c.quarantined_from,
                    "quarantinedUntil": c.quarantined_until,
                    "lastRound": c.last_round,
                }
                for name, c in sorted(self.clients.items())
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReputationState:
        if data.get("version") != 1:
            raise ValueError(f"reputation state: unsupported version {data.get('version')!r} (expected 1)")
        clients: dict[str, ClientReputation] = {}
        for name, c in dict(data.get("clients") or {}).items():
            try:
                clients[str(name)] = ClientReputation(
                    score=float(c["score"]),
                    flags=tuple(bool(b) for b in c["flags"]),
                    quarantined_from=None if c["quarantinedFrom"] is None else int(c["quarantinedFrom"]),
                    quarantined_until=None if c["quarantinedUntil"] is None else int(c["quarantinedUntil"]),
                    last_round=None if c["lastRound"] is None else int(c["lastRound"]),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"reputation state: client {name!r} is malformed ({e!r})") from e
        rnd = data.get("round")
        return cls(clients=clients, round=None if rnd is None else int(rnd))


def is_quarantined(state: ReputationState, client: str, round: int) -> bool:
    """Whether ``client`` sits out ``round`` (its tasks are not sampled)."""
    c = state.clients.get(client)
    return (
        c is not None
        and c.quarantined_from is not None
        and c.quarantined_until is not None
        and c.quarantined_from <= round <= c.quarantined_until
    )


def decayed_score(state: ReputationState, client: str, round: int, decay: float) -> float:
    """The client's reputation score as of ``round`` (decayed since it was last updated)."""
    c = state.clients.get(client)
    if c is None or c.last_round is None:
        return 0.0
    return c.score * decay ** max(0, round - c.last_round)


def update_reputation(
    state: ReputationState,
    round: int,
    flagged: Mapping[str, bool],
    decay: float,
    k: int,
    w: int,
    q: int,
) -> tuple[ReputationState, list[str]]:
    """Fold one round's flags into the reputation.

    Each client in ``flagged`` (those that took part in ``round``) gets ``score = score * decay**(rounds
    since its last update) + flag`` and its flag appended to a window of its last ``w`` rounds. A client
    flagged in at least ``k`` of them, and not already quarantined, is quarantined for the next ``q``
    rounds (``round + 1 .. round + q``) and its window starts afresh, so after release it needs k new
    flags to be quarantined again. Returns the new state and the newly quarantined clients, sorted.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if not 1 <= k <= w:
        raise ValueError(f"need 1 <= k <= w (flagged in k of the last w rounds), got k={k}, w={w}")
    if q < 0:
        raise ValueError(f"q (rounds in quarantine) must be >= 0, got {q}")
    if state.round is not None and round <= state.round:
        raise ValueError(f"round {round} was already folded in (state is at round {state.round})")
    clients = dict(state.clients)
    newly: list[str] = []
    for name in sorted(flagged):
        flag = bool(flagged[name])
        old = clients.get(name, ClientReputation())
        score = (0.0 if old.last_round is None else old.score * decay ** (round - old.last_round)) + float(flag)
        flags = (*old.flags, flag)[-w:]
        start, until = old.quarantined_from, old.quarantined_until
        if sum(flags) >= k and q > 0 and not (until is not None and round <= until):
            start, until = round + 1, round + q
            flags = ()
            newly.append(name)
        clients[name] = replace(
            old, score=score, flags=flags, quarantined_from=start, quarantined_until=until, last_round=round
        )
    return ReputationState(clients=clients, round=round), newly


# --- attacks (experiments only) ---------------------------------------------------------------------------


def sign_flip(u: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``-scale * u``: the update pointing the other way."""
    return u * -scale


def scaled(u: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor * u``: an honest direction with a boosted norm."""
    return u * factor


def gaussian(u: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise ``N(0, std^2)`` of u's shape in place of the update (Xie et al. 2018, "Generalized
    Byzantine-tolerant SGD"); deterministic for a seeded ``generator``."""
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    noise = torch.randn(u.shape, generator=generator, dtype=torch.float64)
    return (noise * std).to(dtype=u.dtype, device=u.device)


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019's z_max: ``s = floor(n/2 + 1) - f``, ``z_max = Phi^-1((n - s) / n)``."""
    if not 0 < f < n:
        raise ValueError(f"ALIE needs 0 < f < n, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    if s <= 0:
        raise ValueError(f"ALIE with f={f} of n={n}: the attackers are a majority (s = {s} <= 0)")
    return statistics.NormalDist().inv_cdf((n - s) / n)


def alie(honest: torch.Tensor, n: int, f: int) -> torch.Tensor:
    """"A little is enough" (Baruch et al. 2019): ``mean - z_max * std`` per coordinate of the honest updates.

    ``honest`` is ``(h, d)``, the round's honest updates; ``n`` counts all clients and ``f`` the attackers;
    the standard deviation is the sample one (ddof = 1; 0 for a single honest update).
    """
    h, _ = robust.check_stack(honest, "honest")
    z = alie_z(n, f)
    mean = honest.mean(dim=0)
    std = honest.std(dim=0, correction=1) if h > 1 else torch.zeros_like(mean)
    return mean - z * std


def ipm(honest: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Inner-product manipulation (Xie et al. 2020): ``-epsilon * mean`` of the honest updates."""
    robust.check_stack(honest, "honest")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return honest.mean(dim=0) * -epsilon


def replay(previous: torch.Tensor) -> torch.Tensor:
    """An earlier update sent again (a copy)."""
    return previous.clone()


def label_flip(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Poisoned labels ``num_classes - 1 - label`` (data poisoning, applied to a client's local data)."""
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return (num_classes - 1) - labels
