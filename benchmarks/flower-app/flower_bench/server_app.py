"""Flower ServerApp: FedAvg over all clients each round, central evaluation, timings to a JSON file.

Timestamps are wall-clock (`time.time()`) so that the harness, which launched the SuperLink, can
subtract its own launch time. A round starts when the strategy configures its training messages and
ends after the central evaluation of the new global model: the same span as Federator's round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flower_bench.task import as_float, evaluate, load_test, make_model, parse_hidden

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round starts and the clients' local-training seconds."""

    def __init__(self, rounds: dict[int, dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds = rounds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.rounds[server_round] = {"round": server_round, "start": time.time()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        record = self.rounds[server_round]
        record["replies_at"] = time.time()
        metrics = [m.content.metric_records["metrics"] for m in replies if m.has_content()]
        seconds = [as_float(m["train-seconds"]) for m in metrics]
        record["participants"] = len(seconds)
        record["train_seconds"] = max(seconds, default=0.0)
        record["train_seconds_sum"] = sum(seconds)
        # Per-client wall-clock timestamps: when its ClientApp process started, finished importing
        # (and warming up torch) and finished training.
        for key in ("process-started", "imported", "fit-ended"):
            record[key.replace("-", "_")] = [as_float(m[key]) for m in metrics]
        out = super().aggregate_train(server_round, replies)
        record["aggregated_at"] = time.time()
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    main_started = time.time()
    cfg = context.run_config
    seed = int(cfg["seed"])
    num_clients = int(cfg["num-clients"])
    num_rounds = int(cfg["num-server-rounds"])
    model = make_model(parse_hidden(str(cfg["hidden-sizes"])), seed)
    x_test, y_test = load_test(float(cfg["test-fraction"]), seed, str(cfg["data-file"]))
    initial = ArrayRecord(model.state_dict())

    # Every client takes part in every round, so round 1 starts once all SuperNodes are connected.
    while len(list(grid.get_node_ids())) < num_clients:
        time.sleep(0.05)
    nodes_ready = time.time()

    rounds: dict[int, dict[str, Any]] = {}
    out_file = str(cfg["out-file"])

    def report(finished: float | None) -> None:
        if not out_file:
            return
        result = {
            "main_started": main_started,
            "nodes_ready": nodes_ready,
            "finished": finished,
            "model_parameters": sum(p.numel() for p in model.parameters()),
            "model_bytes": initial.count_bytes(),
            "rounds": [rounds[r] for r in sorted(rounds) if "end" in rounds[r]],
        }
        tmp = Path(f"{out_file}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out_file)

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, x_test, y_test)
        if server_round in rounds:
            rounds[server_round].update(end=time.time(), loss=loss, accuracy=accuracy)
            report(finished=None)  # progress after every round, so a run cut short still tells something
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    strategy = TimedFedAvg(
        rounds,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=num_clients,
        min_available_nodes=num_clients,
    )
    train_config = ConfigRecord()
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        train_config=train_config,
        evaluate_fn=central_evaluation,
    )

    report(finished=time.time())
