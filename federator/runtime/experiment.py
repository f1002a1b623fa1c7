"""A whole federation in one process, for experiments: the server's sampling, the clients' training (same
seeds as a worker) and the same aggregation pipeline and server optimizer, without gRPC or workers.

`federator run` is the real thing; this exists so that the attack-accuracy benchmark and the accuracy tests
can try many rule x attack pairs in seconds. Every step it calls is the code the server and the clients run.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from federator.api.models import FederationSpec
from federator.runtime.aggregation import AggregationPipeline, AggregationState, ServerOptimizerState, server_update
from federator.runtime.aggregation.attacks import ClientAttack, local_data
from federator.runtime.data import prepare_data
from federator.runtime.models import build_model
from federator.runtime.server import sample_clients
from federator.runtime.training import evaluate, get_params, set_params, train_local


@dataclass
class ExperimentResult:
    rounds: list[dict[str, Any]] = field(default_factory=list)
    attackers: tuple[str, ...] = ()

    @property
    def final_accuracy(self) -> float:
        return float(self.rounds[-1]["accuracy"])


def run_experiment(spec: FederationSpec, state: AggregationState | None = None) -> ExperimentResult:
    """Train `spec.rounds` rounds in-process and return the per-round records (accuracy, loss, detection)."""
    data = prepare_data(spec)
    model = build_model(spec.model, data.input_shape, data.num_classes, seed=spec.data.seed)
    worker = build_model(spec.model, data.input_shape, data.num_classes, seed=spec.data.seed)
    params = get_params(model)
    pipeline = AggregationPipeline(spec, params)
    attack = ClientAttack(spec)  # what an attacking worker does to its update (sign flip, scaled, noise, replay)
    state = state or AggregationState()
    opt = ServerOptimizerState()
    result = ExperimentResult(attackers=tuple(sorted(pipeline.attackers)))
    for rnd in range(1, spec.rounds + 1):
        sampled = sample_clients(spec, rnd, 0, [], state.reputation)
        agg = pipeline.begin_round(rnd, params, len(sampled), [c for c, _ in sampled])
        for client_id, _silo in sampled:
            set_params(worker, params)
            local = local_data(spec, client_id, data.client(int(client_id.removeprefix("sim-"))))
            seed = zlib.crc32(f"{spec.data.seed}:{rnd}:{client_id}".encode())
            res = train_local(worker, local, spec.training, seed=seed,
                              global_params=params if spec.training.proximalMu > 0 else None)
            agg.add(client_id, attack.apply(client_id, rnd, get_params(worker), params), float(res.num_samples))
        outcome = agg.finish(state)
        state = outcome.state
        params, opt = server_update(params, outcome.aggregate, spec.aggregation.serverOptimizer, opt)
        set_params(model, params)
        loss, acc = evaluate(model, data.test)
        result.rounds.append({
            "round": rnd, "accuracy": acc, "loss": loss, "sampled": [c for c, _ in sampled],
            "flagged": outcome.flagged, "quarantined": outcome.newly_quarantined, "used": outcome.used,
        })
    return result
