"""Models far above gRPC's 4 MiB message limit: a 128 MB model goes down and its update comes back up."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from federator.api.models import Federation
from federator.runtime.client import Worker
from federator.runtime.server import FederationServer
from federator.runtime.transport import encode
from tests.helpers.manifests import manifest

MB = 128


def test_128mb_model_round_trips_over_grpc(tmp_path: Path) -> None:
    doc = manifest(
        rounds=1,
        model={"name": "tests.helpers.bigmodel:ballast", "args": {"megabytes": MB}},
        clients={"count": 1, "perRound": 1, "minPerRound": 1, "roundTimeoutSeconds": 120},
        server={"maxMessageMiB": 4},  # gRPC's default limit: a single message could not carry the model
    )
    fed = Federation.model_validate(doc)
    server = FederationServer(fed, tmp_path, ["t"]).start()
    ballast = server.params["ballast"]
    ballast.copy_(torch.linspace(-1, 1, ballast.numel()))  # distinctive content, not zeros
    server.downlink.full = encode(server.params)  # its checksums describe the new content
    sent = {k: v.clone() for k, v in server.params.items()}
    worker = Worker(fed, f"127.0.0.1:{server.port}", "t", name="big")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert server.run() == 0
        thread.join(60)
    finally:
        worker.close()
        server.stop()
    assert server.layout.total_bytes > MB * (1 << 20)
    assert server.traffic.wire["downlink"] >= MB * (1 << 20) and server.traffic.wire["uplink"] >= MB * (1 << 20)
    assert worker.tasks_done == 1
    # the ballast has no gradient: it must come back bit-identical after two trips through the chunker
    assert torch.equal(server.params["ballast"], sent["ballast"])
    # the head was trained, so the aggregated model differs there
    assert not torch.equal(server.params["head.weight"], sent["head.weight"])
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(saved["ballast"], sent["ballast"])
