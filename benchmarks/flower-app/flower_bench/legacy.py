"""The same task on Flower's `start_server` / `start_client` gRPC API (deprecated, still shipped in 1.41).

Long-lived client processes that keep their data and torch warm, and a server that pushes work over
open streams: the fastest way Flower 1.41 runs a federation of separate processes, and the fair anchor
for Federator's overhead per round. The server writes the same JSON as the ServerApp.

    python -m flower_bench.legacy server --port P --config run-config.json
    python -m flower_bench.legacy client --port P --config run-config.json --partition-id 3
"""

from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flower_bench.task import evaluate, load_partition, load_test, make_model, parse_hidden, train, warm_up


def _arrays(model: torch.nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def _load(model: torch.nn.Module, arrays: list[np.ndarray]) -> None:
    keys = list(model.state_dict().keys())
    model.load_state_dict(OrderedDict((k, torch.from_numpy(np.asarray(a))) for k, a in zip(keys, arrays, strict=True)))


def serve(port: int, cfg: dict[str, Any]) -> None:
    from flwr.server import ServerConfig, start_server
    from flwr.server.strategy import FedAvg

    try:
        from flwr.common import ndarrays_to_parameters
    except ImportError:  # pragma: no cover - moved in later releases
        from flwr.compat.common import ndarrays_to_parameters  # type: ignore[no-redef]

    main_started = time.time()
    seed, num_clients = int(cfg["seed"]), int(cfg["num-clients"])
    model = make_model(parse_hidden(str(cfg["hidden-sizes"])), seed)
    x_test, y_test = load_test(float(cfg["test-fraction"]), seed, str(cfg["data-file"]))
    rounds: dict[int, dict[str, Any]] = {}
    out_file = str(cfg["out-file"])
    state: dict[str, Any] = {"nodes_ready": None}

    def report(finished: float | None) -> None:
        result = {
            "main_started": main_started, "nodes_ready": state["nodes_ready"], "finished": finished,
            "model_parameters": sum(p.numel() for p in model.parameters()),
            "model_bytes": sum(a.nbytes for a in _arrays(model)),
            "rounds": [rounds[r] for r in sorted(rounds) if "end" in rounds[r]],
        }
        tmp = Path(f"{out_file}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out_file)

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            client_manager.wait_for(num_clients, timeout=3600)  # round 1 starts once every client is in
            if state["nodes_ready"] is None:
                state["nodes_ready"] = time.time()
            rounds[server_round] = {"round": server_round, "start": time.time()}
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            record = rounds[server_round]
            record["replies_at"] = time.time()
            seconds = [float(r.metrics["train-seconds"]) for _, r in results]
            record["participants"] = len(seconds)
            record["train_seconds"] = max(seconds, default=0.0)
            record["fit_ended"] = [float(r.metrics["fit-ended"]) for _, r in results]
            return super().aggregate_fit(server_round, results, failures)

    def central_evaluation(server_round: int, arrays: list[np.ndarray], _config: Any) -> tuple[float, dict[str, Any]]:
        _load(model, arrays)
        loss, accuracy = evaluate(model, x_test, y_test)
        if server_round in rounds:
            rounds[server_round].update(end=time.time(), loss=loss, accuracy=accuracy)
            report(finished=None)
        return loss, {"accuracy": accuracy}

    strategy = TimedFedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_clients, min_evaluate_clients=0,
        min_available_clients=num_clients, evaluate_fn=central_evaluation,
        initial_parameters=ndarrays_to_parameters(_arrays(model)),
    )
    start_server(server_address=f"127.0.0.1:{port}", config=ServerConfig(num_rounds=int(cfg["num-server-rounds"])),
                 strategy=strategy)
    report(finished=time.time())


def client(port: int, cfg: dict[str, Any], partition_id: int) -> None:
    from flwr.client import NumPyClient
    from flwr.compat.client.app import start_client

    torch.set_num_threads(1)  # ten clients share the machine's cores, as the deployment runtime's ClientApps
    warm_up()
    seed, num_clients = int(cfg["seed"]), int(cfg["num-clients"])
    model = make_model(parse_hidden(str(cfg["hidden-sizes"])), seed)
    x, y = load_partition(partition_id, num_clients, float(cfg["test-fraction"]), seed, str(cfg["data-file"]))

    class Client(NumPyClient):  # type: ignore[misc]
        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            _load(model, parameters)
            server_round = int(config.get("server_round", 0))
            loss, seconds = train(model, x, y, epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]),
                                  lr=float(cfg["learning-rate"]), momentum=float(cfg["momentum"]),
                                  seed=seed * 1_000_003 + server_round * 1_009 + partition_id)
            return _arrays(model), len(y), {"train-loss": loss, "train-seconds": seconds, "fit-ended": time.time()}

    start_client(server_address=f"127.0.0.1:{port}", client=Client().to_client(), insecure=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["server", "client"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--config", required=True, help="the run config as JSON")
    ap.add_argument("--partition-id", type=int, default=0)
    args = ap.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    if args.role == "server":
        serve(args.port, cfg)
    else:
        client(args.port, cfg, args.partition_id)


if __name__ == "__main__":
    main()
