"""data.normalize end to end: an in-process server and real workers over gRPC on 127.0.0.1, real training."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from federator.api.models import Federation
from federator.runtime.checkpoint import load_checkpoint, save_checkpoint
from federator.runtime.client import Worker
from federator.runtime.data import ArrayDataset, prepare_data
from federator.runtime.normalization import (
    combine_stats,
    feature_stats,
    normalizer_from_stats,
    stats_to_proto,
)
from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.proto import federator_pb2_grpc as pb_grpc
from federator.runtime.server import CHECKPOINT_FILE, FederationServer
from tests.helpers.inprocess import run_in_process
from tests.helpers.manifests import manifest
from tests.helpers.tables import raw_scale_table


def _table_manifest(path: Path, rounds: int, **data: Any) -> dict[str, Any]:
    x, y = raw_scale_table()
    np.savez(path, x=x, y=y)
    return manifest(
        rounds=rounds,
        data={"dataset": "npz", "path": str(path), "seed": 0, **data},
        training={"localEpochs": 2, "batchSize": 16, "learningRate": 0.05},
        clients={"count": 4, "perRound": 4, "minPerRound": 4, "roundTimeoutSeconds": 60, "workers": 2},
    )


def _run(tmp_path: Path, doc: dict[str, Any], workers: int = 2) -> FederationServer:
    return run_in_process(doc, tmp_path / "state", workers)[0]


def test_raw_scale_table_learns_with_the_default_and_is_flagged_without_it(tmp_path: Path) -> None:
    doc = _table_manifest(tmp_path / "table.npz", rounds=4)
    server = _run(tmp_path / "default", doc)
    assert server.phase == "Succeeded"
    assert server.status()["normalize"] == "standard"
    assert server.history[-1]["accuracy"] >= 0.9, [r["accuracy"] for r in server.history]
    assert server.status()["warning"] == ""
    # the checkpoint holds the normalisation, equal to the one from the pooled training data
    state = load_checkpoint(tmp_path / "default" / "state" / CHECKPOINT_FILE)
    assert state is not None and state["normalization"]["mode"] == "standard"
    pooled = feature_stats(prepare_data(Federation.model_validate(doc).spec).train.x)
    want = normalizer_from_stats("standard", pooled)
    assert want is not None
    np.testing.assert_allclose(state["normalization"]["shift"].numpy(), want.shift, rtol=1e-6)
    np.testing.assert_allclose(state["normalization"]["scale"].numpy(), want.scale, rtol=1e-6)
    resumed = FederationServer(Federation.model_validate(doc), tmp_path / "default" / "state", ["t"]).start()
    resumed.stop(grace=0)
    assert resumed.resumed and resumed._normalization_fixed  # a restarted server keeps it, never recomputes
    assert resumed.normalizer is not None and resumed.normalizer.same_as(server.normalizer)
    np.testing.assert_array_equal(resumed.eval_data.x, server.eval_data.x)
    del state["normalization"]  # a checkpoint from before data.normalize: its model saw raw features
    save_checkpoint(tmp_path / "default" / "state" / CHECKPOINT_FILE, state)
    old = FederationServer(Federation.model_validate(doc), tmp_path / "default" / "state", ["t"]).start()
    old.stop(grace=0)
    assert old._normalization_fixed and old.normalizer is None and old.eval_data is old.data.test

    raw = _table_manifest(tmp_path / "table.npz", rounds=3, normalize="none")
    stuck = _run(tmp_path / "none", raw)
    accs = [r["accuracy"] for r in stuck.history]
    assert stuck.status()["normalize"] == "none"
    assert max(accs) < 0.8, accs
    assert "data.normalize" in stuck.status()["warning"], (accs, stuck._majority)


def test_a_silos_statistics_join_the_pooled_ones(tmp_path: Path) -> None:
    doc = _table_manifest(tmp_path / "table.npz", rounds=1)
    fed = Federation.model_validate(doc)
    server = FederationServer(fed, tmp_path / "state", ["t", "silo:hospital=s"]).start()
    try:
        silo_x = raw_scale_table(samples=80, seed=5)[0] * np.float32(3.0)  # a silo with its own, shifted data
        stub = pb_grpc.FederatorStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        stub.Join(pb.JoinRequest(token="s", worker_name="h", silo="hospital", silo_samples=80,
                                 feature_stats=stats_to_proto(feature_stats(silo_x))), timeout=30)
        server._fix_normalization()
    finally:
        server.stop()
    data = prepare_data(fed.spec)
    both = combine_stats([feature_stats(data.train.x), feature_stats(silo_x)])
    want = normalizer_from_stats("standard", both)
    assert want is not None and server.normalizer is not None
    np.testing.assert_allclose(server.normalizer.shift, want.shift, rtol=1e-6)
    np.testing.assert_allclose(server.normalizer.scale, want.scale, rtol=1e-6)
    assert not np.allclose(server.normalizer.shift, feature_stats(data.train.x).sum / len(data.train), rtol=1e-3)
    # central evaluation uses the same normalisation
    np.testing.assert_array_equal(server.eval_data.x, (data.test.x - want.shift) / want.scale)


def test_a_silo_worker_sends_its_statistics_and_trains_normalised(tmp_path: Path) -> None:
    doc = _table_manifest(tmp_path / "table.npz", rounds=3)
    doc["spec"]["clients"].update({"count": 3, "perRound": 3, "minPerRound": 3})  # 3 of the 4 (with the silo)
    all_x, all_y = raw_scale_table(samples=720)  # the same table: the federation gets 600 rows, the silo 120
    np.savez(tmp_path / "table.npz", x=all_x[:600], y=all_y[:600])
    fed = Federation.model_validate(doc)
    x, y = all_x[600:], all_y[600:]
    silo_data = ArrayDataset(x, y, 2)
    server = FederationServer(fed, tmp_path / "state", ["t", "silo:hospital=s"]).start()
    address = f"127.0.0.1:{server.port}"
    silo = Worker(fed, address, "s", name="hospital", silo="hospital", silo_data=silo_data)
    sim = Worker(fed, address, "t", name="sim")
    threads = [threading.Thread(target=silo.run, daemon=True)]
    threads[0].start()
    try:
        deadline = time.monotonic() + 60  # the silo joins first, so its statistics are in before round 1
        while "hospital" not in server.silo_features and time.monotonic() < deadline:
            time.sleep(0.05)
        threads.append(threading.Thread(target=sim.run, daemon=True))
        threads[1].start()
        server.run()
        for t in threads:
            t.join(30)
    finally:
        silo.close()
        sim.close()
        server.stop()
    assert server.phase == "Succeeded"
    assert server.silo_stats["hospital"]["roundsParticipated"] >= 1  # the seeded sampling picks it
    sent = server.silo_features["hospital"]
    np.testing.assert_array_equal(sent.sum, feature_stats(x).sum)  # statistics, not rows, crossed the wire
    data = prepare_data(fed.spec)
    want = normalizer_from_stats("standard", combine_stats([feature_stats(data.train.x), feature_stats(x)]))
    assert want is not None and server.normalizer is not None
    np.testing.assert_allclose(server.normalizer.shift, want.shift, rtol=1e-6)
    # the silo trained on its data normalised with the federation's shift and scale
    assert silo._normalized is not None and silo._normalized[0].same_as(server.normalizer)
    np.testing.assert_array_equal(silo._normalized[1].x, (x - server.normalizer.shift) / server.normalizer.scale)
    accs = [r["accuracy"] for r in server.history]
    assert accs[-1] > server._majority + 0.1, accs  # learning, well off the majority-class rate
