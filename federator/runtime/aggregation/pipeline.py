"""The aggregation pipeline: what happens to an accepted update until it is part of the next global model.

    accepted update (decoded, checked by the server)
      -> per-update stages (norm clipping)                      stages.py
      -> [buffered] ALIE / IPM simulation (experiments only)    attacks.py
      -> [buffered] scoring, exclusion of flagged updates       byzantine.score_updates
      -> [buffered] bucketing or nearest-neighbour mixing       robust.bucketing, robust.nnm
      -> the round's rule (registry)                            rules.py
      -> post stages: the server optimizer                      server_optimizer.py

FedAvg without scoring, NNM or a server-simulated attack streams: each update is added to a FedAvgAccumulator
as it arrives and the round holds O(model) memory. Anything that needs every update of the round (a robust
rule, NNM, detection, ALIE/IPM) buffers the round's updates as differences to the global model, one float32 row each:
n x d x 4 bytes for n updates of a d-parameter model, checked against `aggregation.maxBufferBytes`.

State kept across rounds (centered clipping's reference, reputations) is the explicit `AggregationState`:
passed in, returned anew, and checkpointed by the server.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from federator.api.buffer import buffer_problem, needs_buffer
from federator.api.models import FederationSpec
from federator.api.tolerance import expected_byzantine
from federator.runtime import byzantine, robust
from federator.runtime.aggregation.attacks import attack_rows, choose_attackers
from federator.runtime.aggregation.fedavg import FedAvgAccumulator
from federator.runtime.aggregation.flat import FlatLayout
from federator.runtime.aggregation.rules import RuleContext, get_rule
from federator.runtime.aggregation.stages import UpdateStage, apply_stages, update_stages
from federator.runtime.training import Params

log = logging.getLogger("federator.aggregation")

MIN_SCORED_UPDATES = 3  # a robust z-score, a median direction or a Krum score needs at least three updates


# ------------------------------------------------------------------------------------------- state


@dataclass
class AggregationState:
    """Everything the pipeline carries from one round to the next."""

    reference: torch.Tensor | None = None  # centered clipping: last round's aggregate update
    reputation: byzantine.ReputationState = field(default_factory=byzantine.ReputationState)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint (torch.load(weights_only=True) reads it back)."""
        return {
            "reference": None if self.reference is None else self.reference.detach().clone(),
            "reputation": self.reputation.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AggregationState:
        ref = d.get("reference")
        if ref is not None and not isinstance(ref, torch.Tensor):
            raise ValueError("aggregation state: reference must be a tensor or None")
        rep = d.get("reputation")  # a "replay" entry (checkpoints from before replay moved to the clients) is ignored
        return cls(
            reference=None if ref is None else ref.clone(),
            reputation=byzantine.ReputationState.from_dict(rep) if rep else byzantine.ReputationState(),
        )


@dataclass(frozen=True)
class UpdateScore:
    """One row of a round's detection table."""

    client: str
    score: float
    flagged: bool

    def as_dict(self) -> dict[str, Any]:
        return {"client": self.client, "score": self.score, "flagged": self.flagged}


@dataclass
class RoundResult:
    aggregate: Params  # the round's aggregate model, before the server optimizer
    state: AggregationState
    scores: list[UpdateScore] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    newly_quarantined: list[str] = field(default_factory=list)
    used: int = 0  # updates that went into the aggregate


# ------------------------------------------------------------------------------------ the pipeline


class AggregationPipeline:
    """Built once per server from the spec and the model; hands out one round aggregator per round and keeps
    the buffers between rounds (the state is not kept here: it is passed in and returned)."""

    def __init__(self, spec: FederationSpec, template: Params) -> None:
        self.spec = spec
        self.rule = get_rule(spec.aggregation.rule)
        self.layout = FlatLayout.of(template)
        self.buffered = needs_buffer(spec)
        problem = buffer_problem(spec, self.layout.size)
        if problem:
            raise ValueError(problem)
        self.stages = update_stages(spec.aggregation)
        self.attackers = frozenset(choose_attackers(spec))
        self._accumulator = FedAvgAccumulator()
        self._buffer = torch.empty(0, 0, dtype=torch.float32)

    def begin_round(self, rnd: int, global_params: Params, capacity: int,
                    clients: Sequence[str] | None = None) -> RoundAggregator:
        """A fresh aggregator for round `rnd` of at most `capacity` updates; with the sampled `clients`
        known, a buffered round writes each update straight into its row in client order (no reordering
        copy at the end)."""
        if self.buffered:
            if self._buffer.shape[0] < capacity or self._buffer.shape[1] != self.layout.size:
                self._buffer = torch.empty(capacity, self.layout.size, dtype=torch.float32)
            return BufferedRound(self, rnd, global_params, self._buffer[:capacity], clients)
        self._accumulator.reset()
        return StreamingRound(self, rnd, global_params, self._accumulator)


class RoundAggregator(ABC):
    """Collects one round's accepted updates; `finish` turns them into the round's aggregate."""

    def __init__(self, pipeline: AggregationPipeline, rnd: int, global_params: Params) -> None:
        self.pipeline = pipeline
        self.round = rnd
        self.global_params = global_params
        self.count = 0

    @abstractmethod
    def add(self, client: str, params: Mapping[str, torch.Tensor], weight: float) -> None:
        """Take one accepted, decoded update of this round."""

    @abstractmethod
    def finish(self, state: AggregationState) -> RoundResult:
        """The round's aggregate (and the state the next round starts from)."""


class StreamingRound(RoundAggregator):
    """FedAvg with O(model) memory: each update is folded into the running weighted mean on arrival."""

    def __init__(self, pipeline: AggregationPipeline, rnd: int, global_params: Params,
                 accumulator: FedAvgAccumulator) -> None:
        super().__init__(pipeline, rnd, global_params)
        self.accumulator = accumulator
        self._global_flat = pipeline.layout.flatten(global_params) if pipeline.stages else None

    def add(self, client: str, params: Mapping[str, torch.Tensor], weight: float) -> None:
        if self._global_flat is not None:
            params = _staged(self.pipeline.layout, self.pipeline.stages, params, self._global_flat)
        self.accumulator.add(params, weight)
        self.count += 1

    def finish(self, state: AggregationState) -> RoundResult:
        return RoundResult(aggregate=self.accumulator.result(), state=state, used=self.count)


def _staged(layout: FlatLayout, stages: list[UpdateStage], params: Mapping[str, torch.Tensor],
            global_flat: torch.Tensor) -> Params:
    row = layout.flatten(params) - global_flat
    row = apply_stages(stages, row.unsqueeze(0))[0]
    return layout.unflatten(global_flat + row, params, params)


class BufferedRound(RoundAggregator):
    """Every update of the round as a float32 row (its difference to the global model)."""

    def __init__(self, pipeline: AggregationPipeline, rnd: int, global_params: Params, buffer: torch.Tensor,
                 sampled: Sequence[str] | None = None) -> None:
        super().__init__(pipeline, rnd, global_params)
        self.buffer = buffer
        # row of each sampled client, in client order; without them rows fill in arrival order
        self._slot = {c: i for i, c in enumerate(sorted(sampled))} if sampled is not None else None
        if self._slot is not None and len(self._slot) > buffer.shape[0]:
            raise ValueError(f"round {rnd}: {len(self._slot)} clients sampled but room for {buffer.shape[0]}")
        self.clients: list[str] = []  # in the order of self.rows
        self.rows: list[int] = []
        self.weights: list[float] = []
        self._global_flat = pipeline.layout.flatten(global_params)
        self._others: list[Params] = []  # each update's non-floating tensors (small: counters and the like)

    def add(self, client: str, params: Mapping[str, torch.Tensor], weight: float) -> None:
        if self._slot is not None:
            if client not in self._slot or self._slot[client] in self.rows:
                raise ValueError(f"round {self.round}: client {client!r} was not sampled or already reported")
            i = self._slot[client]
        elif self.count >= self.buffer.shape[0]:
            raise ValueError(f"round {self.round}: more updates than the {self.buffer.shape[0]} sampled")
        else:
            i = self.count
        row = self.buffer[i]
        self.pipeline.layout.flatten_into(params, row)
        row.sub_(self._global_flat)
        self._others.append({k: t.detach().clone() for k, t in params.items() if not t.is_floating_point()})
        self.clients.append(client)
        self.rows.append(i)
        self.weights.append(float(weight))
        self.count += 1

    def finish(self, state: AggregationState) -> RoundResult:
        p = self.pipeline
        spec = p.spec
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        # rows in client order: the round's result does not depend on the order updates arrived in, so a
        # resumed server (or the in-process experiment runner) reproduces it exactly
        order = sorted(range(self.count), key=lambda j: self.clients[j])
        clients = [self.clients[j] for j in order]
        rows = [self.rows[j] for j in order]
        # all sampled clients reported into their slots: the rows are a view, no copy
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        block = self.buffer[rows[0]:rows[0] + len(rows)] if contiguous else self.buffer[rows]
        x = apply_stages(p.stages, block)
        weights = torch.tensor([self.weights[j] for j in order], dtype=torch.float64)
        new_state = AggregationState(state.reference, state.reputation)
        attack = spec.byzantine.attack
        if attack is not None and p.attackers:
            x = attack_rows(x, clients, p.attackers, attack)
        f = expected_byzantine(spec.byzantine.expectedFraction, self.count)

        result = RoundResult(aggregate={}, state=new_state)
        keep = torch.ones(self.count, dtype=torch.bool)
        det = spec.byzantine.detection
        if det is not None and self.count < MIN_SCORED_UPDATES:
            log.info("round %d: %d updates are too few to score; none is flagged", self.round, self.count)
        elif det is not None:
            reference = robust.coordinate_median(x) if det.method == "cosine" else None
            f_score = max(0, min(max(f, 1), self.count - 3))  # Krum scores need n - f - 2 >= 1 neighbours
            scores = byzantine.score_updates(x, det.method, aggregate=reference, f=f_score)
            flagged = scores > det.effective_threshold
            if bool(flagged.all()):
                log.warning("round %d: every update scored above the threshold %g; none is left out",
                            self.round, det.effective_threshold)
            else:
                keep = ~flagged
            result.scores = [UpdateScore(c, float(s), bool(fl))
                             for c, s, fl in zip(clients, scores.tolist(), flagged.tolist(), strict=True)]
            result.flagged = [s.client for s in result.scores if s.flagged]
            rep = spec.byzantine.reputation
            if rep is not None:
                new_state.reputation, result.newly_quarantined = byzantine.update_reputation(
                    state.reputation, self.round, {s.client: s.flagged for s in result.scores},
                    decay=rep.decay, k=rep.k, w=rep.window, q=rep.quarantineRounds)
        if not bool(keep.all()):
            x, weights = x[keep], weights[keep]
        if spec.aggregation.bucketing is not None and spec.aggregation.bucketing.size > 1:
            gen = torch.Generator().manual_seed(_seed(spec.data.seed, self.round, 2))
            x = robust.bucketing(x, spec.aggregation.bucketing.size, gen)
            weights = torch.ones(x.shape[0], dtype=torch.float64)
        if spec.aggregation.nnm is not None:  # each row keeps its weight: mixed row i is centred on client i
            f_nnm = spec.aggregation.nnm.f if spec.aggregation.nnm.f is not None else f
            x = robust.nnm(x, max(0, min(f_nnm, x.shape[0] - 1)))
        ctx = RuleContext(spec.aggregation, f, weights, state.reference)
        delta = p.rule.kernel(x, ctx).to(torch.float32)
        if p.rule.keeps_reference:
            new_state.reference = delta.clone()
        result.aggregate = p.layout.unflatten(self._global_flat + delta, self._others[order[0]], self.global_params)
        result.used = int(keep.sum())
        return result


def _seed(*parts: int) -> int:
    """One 63-bit seed from a few ints (stable across processes, unlike hash())."""
    h = 1469598103934665603
    for x in parts:
        h = ((h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h
