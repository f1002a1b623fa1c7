"""Aggregation: the pipeline seam of the server (see pipeline.py), streaming FedAvg, robust rules through
one registry, and the server optimizers."""

from federator.api.buffer import buffer_bytes, buffer_problem, needs_buffer
from federator.runtime.aggregation.fedavg import FedAvgAccumulator, check_same_layout, weighted_average
from federator.runtime.aggregation.pipeline import (
    AggregationPipeline,
    AggregationState,
    RoundAggregator,
    RoundResult,
    UpdateScore,
)
from federator.runtime.aggregation.rules import RULES, Rule, RuleContext, get_rule
from federator.runtime.aggregation.server_optimizer import (
    ServerOptimizerState,
    server_update,
    state_from_dict,
    state_to_dict,
)

__all__ = [
    "RULES",
    "AggregationPipeline",
    "AggregationState",
    "FedAvgAccumulator",
    "RoundAggregator",
    "RoundResult",
    "Rule",
    "RuleContext",
    "ServerOptimizerState",
    "UpdateScore",
    "buffer_bytes",
    "buffer_problem",
    "check_same_layout",
    "get_rule",
    "needs_buffer",
    "server_update",
    "state_from_dict",
    "state_to_dict",
    "weighted_average",
]
