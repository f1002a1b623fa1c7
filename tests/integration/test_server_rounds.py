"""Round mechanics with an in-process server and in-process workers over real gRPC on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from federator.api.models import Federation
from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.proto import federator_pb2_grpc as pb_grpc
from federator.runtime.server import FederationServer
from tests.helpers.inprocess import run_in_process
from tests.helpers.manifests import manifest


def run_federation(tmp_path: Path, doc: dict[str, Any], workers: int = 2) -> FederationServer:
    return run_in_process(doc, tmp_path, workers)[0]


@pytest.mark.parametrize(
    ("label", "training", "aggregation"),
    [
        ("fedavg", {}, {}),
        ("fedprox", {"proximalMu": 0.1}, {}),
        ("fedadam", {}, {"serverOptimizer": {"name": "adam", "learningRate": 0.01}}),
        ("fedyogi", {}, {"serverOptimizer": {"name": "yogi", "learningRate": 0.01}}),
    ],
)
def test_each_strategy_learns(tmp_path: Path, label: str, training: dict[str, Any],
                              aggregation: dict[str, Any]) -> None:
    doc = manifest(rounds=5, training={"learningRate": 0.1, "momentum": 0.9, **training}, aggregation=aggregation)
    server = run_federation(tmp_path, doc)
    assert server.phase == "Succeeded"
    acc = [r["accuracy"] for r in server.history]
    assert len(acc) == 5
    assert acc[-1] > 0.6 and acc[-1] > acc[0], (label, acc)
    if aggregation:
        assert server.opt_state.step == 5 and server.opt_state.v  # the adaptive state was kept and advanced


def test_same_seed_same_model(tmp_path: Path) -> None:
    doc = manifest(rounds=2, clients={"workers": 1})
    a = run_federation(tmp_path / "a", doc, workers=1)
    b = run_federation(tmp_path / "b", doc, workers=1)
    assert [r["accuracy"] for r in a.history] == [r["accuracy"] for r in b.history]
    assert all(bool((a.params[k] == b.params[k]).all()) for k in a.params)


def test_round_without_enough_clients_is_retried_then_fails_with_the_reason(tmp_path: Path) -> None:
    doc = manifest(rounds=3, clients={"count": 4, "perRound": 4, "minPerRound": 2, "roundTimeoutSeconds": 0.5,
                                      "maxRoundRetries": 2})
    server = FederationServer(Federation.model_validate(doc), tmp_path, ["t"]).start()
    stub = pb_grpc.FederatorStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    lazy = stub.Join(pb.JoinRequest(token="t", worker_name="lazy"))  # joins, beats, never trains

    def beat() -> None:
        while server.phase != "Failed":
            stub.Heartbeat(pb.HeartbeatRequest(token="t", worker_id=lazy.worker_id))
            time.sleep(0.2)

    threading.Thread(target=beat, daemon=True).start()
    try:
        code = server.run()
    finally:
        server.stop()
    assert code == 1
    assert server.phase == "Failed" and server.completed == 0
    assert "round 1 got fewer than clients.minPerRound=2" in server.message
    assert "in 3 attempts" in server.message
    assert server.status()["phase"] == "Failed" and server.status()["message"] == server.message
