"""Flower ClientApp: local SGD on this SuperNode's IID partition of digits.

Flower's deployment runtime starts one `flwr-clientapp` process per message, so this module is
imported once per client per round. It warms torch up at import, so that the timed `fit` covers the
training loop only (as in Federator's long-lived workers); the warm-up counts as Flower's overhead.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_bench.task import as_float, load_partition, make_model, parse_hidden, process_start_time, train, warm_up

PROCESS_STARTED = process_start_time()
# Ten SuperNodes share the machine's cores: one intra-op thread per ClientApp avoids oversubscription.
torch.set_num_threads(1)
warm_up()
IMPORTED = time.time()

app = ClientApp()


@app.train()
def fit(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    seed = int(cfg["seed"])
    server_round = int(as_float(msg.content.config_records["config"]["server-round"]))

    model = make_model(parse_hidden(str(cfg["hidden-sizes"])), seed)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    test_fraction = float(cfg["test-fraction"])
    x, y = load_partition(partition_id, num_partitions, test_fraction, seed, str(cfg["data-file"]))
    loss, seconds = train(
        model,
        x,
        y,
        epochs=int(cfg["local-epochs"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(cfg["learning-rate"]),
        momentum=float(cfg["momentum"]),
        seed=seed * 1_000_003 + server_round * 1_009 + partition_id,
    )
    metrics = MetricRecord(
        {
            "train-loss": loss,
            "train-seconds": seconds,
            "num-examples": len(y),
            # Wall-clock timestamps for the round breakdown in the benchmark report.
            "process-started": PROCESS_STARTED,
            "imported": IMPORTED,
            "fit-ended": time.time(),
        }
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
