"""The Argo CD health checks (Lua, run with lupa as Argo CD runs them: `obj` global, the chunk returns
`hs`) on the statuses the operator really writes, made by its own pure status functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa
import pytest
import yaml

from federator.api.serverstatus import ServerStatus, SiloStatus
from federator.operator import status

ROOT = Path(__file__).resolve().parents[2]
ARGO = ROOT / "examples" / "argocd"
NOW = "2026-01-01T00:00:00Z"


def health(script: str, obj: dict[str, Any]) -> tuple[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(script)
    return str(hs["status"]), str(hs["message"])


def resource(kind: str, st: Any | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "federator.dev/v1alpha1", "kind": kind,
                           "metadata": {"name": "demo", "namespace": "default", "generation": generation}}
    if st is not None:
        obj["status"] = status.dump(st)
    return obj


def report(phase: str, **fields: Any) -> ServerStatus:
    return ServerStatus.model_validate({"phase": phase, "round": 3, "rounds": 5, "accuracy": 0.9, **fields})


def deployed() -> dict[str, Any]:
    return status.dump(status.federation_deployed(None, generation=1, rounds=5, now=NOW))


FEDERATIONS = {
    "new": (None, "Progressing"),
    "deployed": (status.federation_deployed(None, generation=1, rounds=5, now=NOW), "Progressing"),
    "pending": (status.federation_observed(deployed(), report("Pending", round=0), now=NOW), "Progressing"),
    "running": (status.federation_observed(deployed(), report("Running"), now=NOW), "Progressing"),
    "succeeded": (status.federation_observed(deployed(), report("Succeeded", round=5), now=NOW), "Healthy"),
    "failed": (status.federation_observed(deployed(), report("Failed", message="too few updates"), now=NOW),
               "Degraded"),
    "invalid": (status.federation_invalid(None, "spec.clients: perRound > count", generation=1, now=NOW), "Degraded"),
    "unreachable": (status.federation_unreachable(deployed(), "connection refused", now=NOW, starting=False),
                    "Degraded"),
}


@pytest.mark.parametrize(("st", "expected"), FEDERATIONS.values(), ids=FEDERATIONS.keys())
def test_federation_health(st: Any, expected: str) -> None:
    got, message = health((ARGO / "health" / "federation.lua").read_text(), resource("Federation", st))
    assert got == expected, message
    assert message


def test_federation_messages_say_why() -> None:
    script = (ARGO / "health" / "federation.lua").read_text()
    running = status.federation_observed(deployed(), report("Running"), now=NOW)
    assert health(script, resource("Federation", running))[1] == "round 3/5, accuracy 0.9000"
    failed = status.federation_observed(deployed(), report("Failed", message="too few updates"), now=NOW)
    assert health(script, resource("Federation", failed))[1] == "TrainingFailed: too few updates"
    done = status.federation_observed(deployed(), report("Succeeded", round=5), now=NOW)
    assert health(script, resource("Federation", done))[1] == "finished round 5/5"


def test_a_status_of_an_older_generation_is_progressing() -> None:
    done = status.federation_observed(deployed(), report("Succeeded", round=5), now=NOW)
    got, message = health((ARGO / "health" / "federation.lua").read_text(), resource("Federation", done, 2))
    assert (got, message) == ("Progressing", "waiting for the operator to reconcile generation 2")


def client_deployed() -> dict[str, Any]:
    return status.dump(status.client_deployed(None, generation=1, selector="a=b", replicas=1, now=NOW))


SILO = SiloStatus(joined=True, roundsParticipated=2, lastUpdateTime=NOW)
CLIENTS = {
    "new": (None, "Progressing"),
    "no-federation": (status.client_waiting(None, status.FEDERATION_NOT_FOUND, "Federation 'demo' not found",
                                            generation=1, now=NOW), "Progressing"),
    "deployed": (status.client_deployed(None, generation=1, selector="a=b", replicas=1, now=NOW), "Progressing"),
    "joined": (status.client_observed(client_deployed(), SILO, replicas=1, now=NOW), "Healthy"),
    "flagged": (status.client_observed(client_deployed(), SILO.model_copy(update={"flagged": True}), replicas=1,
                                       now=NOW), "Degraded"),
    "invalid": (status.client_invalid(None, "spec.data.path: must be relative", generation=1, now=NOW), "Degraded"),
    "unreachable": (status.client_unreachable(status.dump(status.client_observed(
        client_deployed(), SILO, replicas=1, now=NOW)), "connection refused", replicas=1, now=NOW), "Progressing"),
}


@pytest.mark.parametrize(("st", "expected"), CLIENTS.values(), ids=CLIENTS.keys())
def test_federated_client_health(st: Any, expected: str) -> None:
    got, message = health((ARGO / "health" / "federatedclient.lua").read_text(), resource("FederatedClient", st))
    assert got == expected, message
    assert message


def test_argocd_cm_carries_the_same_scripts() -> None:
    cm = yaml.safe_load((ARGO / "argocd-cm.yaml").read_text())
    data = cm["data"]
    assert data["resource.customizations.health.federator.dev_Federation"] == (
        ARGO / "health" / "federation.lua").read_text()
    assert data["resource.customizations.health.federator.dev_FederatedClient"] == (
        ARGO / "health" / "federatedclient.lua").read_text()
    app = {"status": {"health": {"status": "Healthy", "message": ""}}}  # the app of apps waits on this
    assert health(data["resource.customizations.health.argoproj.io_Application"], app)[0] == "Healthy"


def test_the_applications_sync_the_operator_before_the_federation() -> None:
    apps = {p.name: yaml.safe_load(p.read_text()) for p in ARGO.glob("*.yaml") if p.name != "argocd-cm.yaml"}
    wave = {name: int(a["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", 0))
            for name, a in apps.items()}
    assert wave["operator.yaml"] < wave["federation.yaml"]
    assert apps["operator.yaml"]["spec"]["source"]["path"] == "charts/federator"
    assert (ROOT / apps["operator.yaml"]["spec"]["source"]["path"] / "Chart.yaml").exists()
    fed_source = apps["federation.yaml"]["spec"]["source"]
    assert (ROOT / fed_source["path"] / fed_source["directory"]["include"]).exists()
    assert "ServerSideApply=true" in apps["operator.yaml"]["spec"]["syncPolicy"]["syncOptions"]  # CRDs upgrade
    include = apps["root.yaml"]["spec"]["source"]["directory"]["include"]
    assert all(name in include for name in ("operator.yaml", "federation.yaml"))
