"""Byzantine detection through the real kopf operator against kmock: flagged clients reach the Federation's
status and events and a silo's FederatedClient; a spec beyond its rule's tolerance is InvalidSpec."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import ApiServer, FakeServers, OperatorRunner, eventually, server_report, settle
from tests.integration.test_operator_kmock import (
    FEDCS,
    FEDCS_URL,
    FEDS,
    FEDS_URL,
    condition,
    create,
    events,
    federated_client,
    federation,
    live,
    must,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


def flagged(client: str, rounds: int, last: int, quarantined: bool) -> dict[str, Any]:
    """One row of the server's flaggedClients, as FederationServer.flagged_clients writes it."""
    return {"client": client, "reason": "cosine", "rounds": rounds, "lastRound": last, "quarantined": quarantined}


async def test_flagged_clients_reach_the_federation_status_events_and_the_silo(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    silo = {"joined": True, "roundsParticipated": 2, "lastUpdateTime": "2026-01-01T00:00:00Z", "flagged": True}
    status_servers.set("demo", server_report(
        "demo", round=2, byzantineFlagged=2, silos={"hospital-a": silo},
        flaggedClients=[flagged("hospital-a", 1, 2, False), flagged("sim-3", 1, 2, False)]))
    async with run_operator():
        await create(kube_api, FEDS_URL, federation())
        await create(kube_api, FEDCS_URL, federated_client())
        st = await eventually(lambda: (f := live(kube_api, FEDS, "demo")) and f.get("status", {}).get(
            "byzantineFlagged") == 2 and f["status"])
        assert st["flaggedClients"] == [flagged("hospital-a", 1, 2, False), flagged("sim-3", 1, 2, False)]
        client = await eventually(lambda: (c := live(kube_api, FEDCS, "hospital-a")) and c["status"].get("flagged")
                                  and c)
        assert condition(client, "Degraded")["reason"] == "Flagged"
        await eventually(lambda: any(e["reason"] == "Flagged" and e["type"] == "Warning"
                                     for e in events(kube_api, "hospital-a")))
        assert not any(e["reason"] == "Quarantined" for e in events(kube_api, "demo"))

        # round 3: sim-3 flagged again, and quarantined (k=2)
        status_servers.set("demo", server_report(
            "demo", round=3, byzantineFlagged=2, silos={"hospital-a": {**silo, "flagged": False}},
            flaggedClients=[flagged("sim-3", 2, 3, True), flagged("hospital-a", 1, 2, False)]))
        await eventually(lambda: any(e["reason"] == "Quarantined" for e in events(kube_api, "demo")))
        await eventually(lambda: not must(kube_api, FEDCS, "hospital-a")["status"]["flagged"])
        await settle(kube_api)
    [q] = [e for e in events(kube_api, "demo") if e["reason"] == "Quarantined"]
    assert q["type"] == "Warning"
    assert q["message"] == ("client sim-3 quarantined: its updates were flagged (cosine) in 2 rounds, last in "
                            "round 3")
    assert must(kube_api, FEDS, "demo")["status"]["flaggedClients"][0] == flagged("sim-3", 2, 3, True)


async def test_a_spec_beyond_its_rules_tolerance_is_invalid_with_the_limit_and_a_fix(
    kube_api: ApiServer, run_operator: OperatorRunner
) -> None:
    async with run_operator():
        await create(kube_api, FEDS_URL, federation(byzantine={"expectedFraction": 0.3}))
        await eventually(lambda: condition(live(kube_api, FEDS, "demo"), "Ready").get("reason") == "InvalidSpec")
        ready = condition(live(kube_api, FEDS, "demo"), "Ready")
        assert ready["status"] == "False"
        assert "aggregation.rule=fedavg tolerates at most 0 of 8" in ready["message"], ready["message"]
        assert "median (tolerates 3)" in ready["message"]
        await eventually(lambda: any(e["reason"] == "InvalidSpec" and "tolerates at most 0 of 8" in e["message"]
                                     for e in events(kube_api, "demo")))
        assert live(kube_api, "apps/v1/statefulsets", "demo-server") is None
