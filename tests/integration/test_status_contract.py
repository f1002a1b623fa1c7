"""One contract for `/status`: a real server's payload, fetched over HTTP the way the operator does, read
with the model the server wrote it with, and turned into the Federation's and the silo's status."""

from __future__ import annotations

import threading
from pathlib import Path

import aiohttp
import pytest

from federator.api.models import Federation
from federator.api.serverstatus import ServerStatus
from federator.operator import status
from federator.operator.reconcile import OperatorConfig, fetch_report
from federator.runtime.client import Worker
from federator.runtime.data import ArrayDataset
from federator.runtime.server import FederationServer
from tests.helpers.manifests import manifest

pytestmark = pytest.mark.timeout(120)


async def read_as_the_operator(fed: Federation, metrics_port: int) -> ServerStatus:
    """The operator's own read (fetch_report); and the raw JSON of one answer read back field for field."""
    url = f"http://127.0.0.1:{metrics_port}/status"
    config = OperatorConfig(status_url_template=url, status_timeout=30.0)
    async with aiohttp.ClientSession() as session:
        report, error, bad = await fetch_report(session, config, fed)
        async with session.get(url) as resp:
            raw = await resp.json()
    assert report is not None and error is None and not bad, error
    assert status.parse_report(raw).payload() == raw  # nothing the server sent is lost or changed
    return report


@pytest.mark.asyncio
async def test_the_operator_reads_a_real_servers_status(tmp_path: Path) -> None:
    fed = Federation.model_validate(manifest(rounds=2, clients={"count": 4, "perRound": 2, "minPerRound": 2}))
    server = FederationServer(fed, tmp_path, ["t", "silo:hospital-a=s"]).start()
    try:
        pending = await read_as_the_operator(fed, server.metrics_port)
        assert (pending.phase, pending.round, pending.rounds, pending.federation) == ("Pending", 0, 2, "test")

        train = server.data.train
        silo_data = ArrayDataset(train.x[:200], train.y[:200], train.num_classes)
        workers = [Worker(fed, f"127.0.0.1:{server.port}", "t", name="w0"),
                   Worker(fed, f"127.0.0.1:{server.port}", "s", name="h", silo="hospital-a", silo_data=silo_data)]
        threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
        for t in threads:
            t.start()
        try:
            assert server.run() == 0
            done = await read_as_the_operator(fed, server.metrics_port)  # the server still serves /status
        finally:
            for t in threads:
                t.join(30)  # they leave when the server says STOP
            for w in workers:
                w.close()
    finally:
        server.stop()

    assert (done.phase, done.round, done.accuracy) == ("Succeeded", 2, server.history[-1]["accuracy"])
    assert set(done.silos) == {"hospital-a"}  # the silo joined

    fed_status = status.federation_observed(
        status.dump(status.federation_deployed({}, generation=1, rounds=2, now="2026-01-01T00:00:00Z")), done,
        now="2026-01-01T00:01:00Z")
    assert (fed_status.phase, fed_status.round, fed_status.accuracy) == ("Succeeded", 2, done.accuracy)
    silo = status.client_observed({}, done.silos["hospital-a"], replicas=1, now="2026-01-01T00:01:00Z")
    assert (silo.joined, silo.roundsParticipated, silo.lastUpdateTime) == (
        done.silos["hospital-a"].joined, done.silos["hospital-a"].roundsParticipated,
        done.silos["hospital-a"].lastUpdateTime)
