"""Pure status functions: the server's report -> FederationStatus, conditions, events."""

from __future__ import annotations

from typing import Any

import pytest

from federator.api.models import FederationStatus
from federator.api.serverstatus import ServerStatus
from federator.operator import status

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:10:00Z"


def report(**overrides: Any) -> ServerStatus:
    payload: dict[str, Any] = {
        "federation": "demo", "phase": "Running", "round": 3, "rounds": 15, "accuracy": 0.8123, "loss": 0.5,
        "epsilon": 1.5, "clients": {"connected": 4, "participants": 8}, "byzantineFlagged": 1,
        "compressionRatio": 12.5, "pendingTasks": 3, "message": "",
        "silos": {"hospital-a": {"joined": True, "roundsParticipated": 3, "lastUpdateTime": T1, "flagged": False}},
    }
    payload.update(overrides)
    return status.parse_report(payload)


def cond(st: dict[str, Any] | FederationStatus, type_: str) -> dict[str, Any]:
    raw = status.dump(st) if isinstance(st, FederationStatus) else st
    found = status.condition(raw, type_)
    assert found is not None, f"no {type_} condition"
    return found


def deployed(generation: int = 1) -> dict[str, Any]:
    return status.dump(status.federation_deployed({}, generation=generation, rounds=15, now=T0))


def test_deployed_sets_generation_and_waits_for_the_server() -> None:
    st = deployed(3)
    assert st["observedGeneration"] == 3 and st["phase"] == "Pending" and st["rounds"] == 15
    assert cond(st, "Ready")["reason"] == status.DEPLOYING and cond(st, "Ready")["status"] == "False"
    assert cond(st, "Progressing")["status"] == "True"
    assert cond(st, "Degraded")["status"] == "False"
    assert [c["type"] for c in st["conditions"]] == ["Ready", "Progressing", "Degraded"]
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] == T0 for c in st["conditions"])
    assert status.should_poll(st)


def test_the_server_report_becomes_the_status() -> None:
    st = status.dump(status.federation_observed(deployed(), report(), now=T1))
    assert {k: st[k] for k in ("phase", "round", "rounds", "accuracy", "loss", "epsilon", "byzantineFlagged",
                               "compressionRatio", "observedGeneration")} == {
        "phase": "Running", "round": 3, "rounds": 15, "accuracy": 0.8123, "loss": 0.5, "epsilon": 1.5,
        "byzantineFlagged": 1, "compressionRatio": 12.5, "observedGeneration": 1}
    assert st["clients"] == {"ready": 4, "participants": 8}
    assert cond(st, "Ready") == {  # the whole condition, as written to the cluster
        "type": "Ready", "status": "True", "reason": status.SERVER_READY, "message": "the server is up",
        "lastTransitionTime": T1, "observedGeneration": 1}
    assert cond(st, "Progressing")["message"] == "round 3/15, accuracy 0.8123"
    assert cond(st, "Ready")["lastTransitionTime"] == T1  # False -> True
    assert cond(st, "Degraded")["lastTransitionTime"] == T0  # stayed False


@pytest.mark.parametrize(("phase", "ready", "progressing", "degraded", "reason"), [
    ("Pending", "True", "True", "False", status.WAITING_FOR_CLIENTS),
    ("Running", "True", "True", "False", status.TRAINING),
    ("Succeeded", "True", "False", "False", status.COMPLETED),
    ("Failed", "False", "False", "True", status.TRAINING_FAILED),
])
def test_conditions_follow_the_phase(phase: str, ready: str, progressing: str, degraded: str, reason: str) -> None:
    st = status.federation_observed(deployed(), report(phase=phase, message="loss is NaN"), now=T1)
    assert (cond(st, "Ready")["status"], cond(st, "Progressing")["status"], cond(st, "Degraded")["status"]) == (
        ready, progressing, degraded)
    assert cond(st, "Progressing")["reason"] == reason
    if phase == "Failed":
        assert cond(st, "Degraded")["message"] == "loss is NaN"


def test_unreachable_server_degrades_after_the_grace_period_and_keeps_progress() -> None:
    running = status.dump(status.federation_observed(deployed(), report(), now=T1))
    st = status.dump(status.federation_unreachable(running, "connection refused", now=T2, starting=False))
    assert (st["phase"], st["round"], st["accuracy"]) == ("Running", 3, 0.8123)
    assert (cond(st, "Degraded")["status"], cond(st, "Degraded")["reason"]) == ("True", status.SERVER_UNREACHABLE)
    assert cond(st, "Degraded")["message"] == "connection refused"
    assert cond(st, "Ready")["status"] == "False"
    assert cond(st, "Progressing")["status"] == "Unknown"
    back = status.dump(status.federation_observed(st, report(round=4), now=T2))
    assert cond(back, "Degraded")["status"] == "False"
    assert status.federation_events(st, back) == [status.Event("Normal", "Recovered", "the server answers again")]


def test_a_starting_server_is_not_degraded() -> None:
    st = status.dump(status.federation_unreachable(deployed(), "connection refused", now=T1, starting=True))
    assert cond(st, "Ready")["reason"] == status.SERVER_STARTING
    assert cond(st, "Degraded")["status"] == "False"
    assert status.in_startup_grace(st, now=T1, grace_seconds=120)
    assert not status.in_startup_grace(st, now=T2, grace_seconds=120)  # T0 + 10 minutes
    running = status.dump(status.federation_observed(deployed(), report(), now=T1))
    assert not status.in_startup_grace(running, now=T1, grace_seconds=120)


def test_a_bad_report_is_degraded_at_once() -> None:
    with pytest.raises(status.BadReport, match="phase"):
        status.parse_report({"phase": "Exploding", "round": 1})
    with pytest.raises(status.BadReport, match="round"):
        status.parse_report({"phase": "Running"})
    st = status.federation_unreachable(deployed(), "phase: bad", now=T1, starting=True, bad_report=True)
    assert cond(st, "Degraded")["reason"] == status.BAD_SERVER_STATUS


def test_a_finished_run_is_left_alone_when_its_server_is_gone() -> None:
    done = status.dump(status.federation_observed(deployed(), report(phase="Succeeded", round=15), now=T1))
    assert status.dump(status.federation_unreachable(done, "gone", now=T2, starting=False)) == done


def test_invalid_spec() -> None:
    st = status.dump(status.federation_invalid(deployed(1), "spec.clients.perRound: too big", generation=2, now=T1))
    assert st["observedGeneration"] == 2
    assert (cond(st, "Ready")["status"], cond(st, "Ready")["reason"]) == ("False", status.INVALID_SPEC)
    assert cond(st, "Ready")["message"] == "spec.clients.perRound: too big"
    assert cond(st, "Degraded")["status"] == "True"
    assert not status.should_poll(st)
    assert status.federation_events(deployed(1), st) == []  # the handler posts InvalidSpec itself
    fixed = status.dump(status.federation_deployed(st, generation=3, rounds=15, now=T2))
    assert cond(fixed, "Ready")["reason"] == status.DEPLOYING and cond(fixed, "Degraded")["status"] == "False"


def test_a_refused_change_stands_while_progress_is_still_reported() -> None:
    running = status.dump(status.federation_observed(deployed(1), report(), now=T1))
    refused = status.dump(status.federation_refused(running, "spec.server.checkpoint.size: 1Gi -> 5Gi ...",
                                                    generation=2, now=T2))
    assert refused["observedGeneration"] == 1  # generation 2 was not applied
    assert (cond(refused, "Ready")["status"], cond(refused, "Ready")["reason"]) == ("False", status.IMMUTABLE_FIELD)
    assert cond(refused, "Ready")["observedGeneration"] == 2
    assert cond(refused, "Degraded")["status"] == "True" and status.should_poll(refused)
    assert status.federation_events(running, refused) == []  # the reconcile posts the Warning itself
    later = status.dump(status.federation_observed(refused, report(round=4), now=T2))
    assert later["round"] == 4 and cond(later, "Ready") == cond(refused, "Ready")
    assert cond(later, "Degraded") == cond(refused, "Degraded")
    assert status.dump(status.federation_unreachable(later, "refused", now=T2, starting=False)) == later
    applied = status.dump(status.federation_deployed(later, generation=3, rounds=15, now=T2))
    assert cond(applied, "Ready")["reason"] == status.DEPLOYING and cond(applied, "Degraded")["status"] == "False"


def test_redeploying_a_running_federation_keeps_its_conditions() -> None:
    running = status.dump(status.federation_observed(deployed(1), report(), now=T1))
    again = status.dump(status.federation_deployed(running, generation=2, rounds=20, now=T2))
    assert again["observedGeneration"] == 2 and again["rounds"] == 20
    assert cond(again, "Ready")["reason"] == status.SERVER_READY


def test_changed_and_events() -> None:
    first = deployed()
    assert not status.changed(first, status.dump(status.federation_deployed(first, generation=1, rounds=15, now=T2)))
    assert status.changed({}, first)
    running = status.dump(status.federation_observed(first, report(), now=T1))
    assert status.federation_events(first, running) == [status.Event("Normal", "Running", "phase Pending -> Running")]
    done = status.dump(status.federation_observed(running, report(phase="Succeeded", round=15), now=T2))
    assert status.federation_events(running, done) == [
        status.Event("Normal", "Succeeded", "phase Running -> Succeeded after 15 rounds, accuracy 0.8123")]
    failed = status.dump(status.federation_observed(running, report(phase="Failed", message="boom"), now=T2))
    assert [e.type for e in status.federation_events(running, failed)] == ["Warning", "Warning"]
    down = status.dump(status.federation_unreachable(running, "refused", now=T2, starting=False))
    assert status.federation_events(running, down) == [status.Event("Warning", status.SERVER_UNREACHABLE, "refused")]
    assert status.federation_events(None, first) == []


def test_set_condition_moves_the_transition_time_only_on_a_flip() -> None:
    conds = status.set_condition([], "Ready", "False", "A", "", now=T0, generation=1)
    conds = status.set_condition(conds, "Ready", "False", "B", "m", now=T1, generation=1)
    assert conds[0].lastTransitionTime == T0 and conds[0].reason == "B"
    conds = status.set_condition(conds, "Ready", "True", "C", "", now=T2, generation=1)
    assert conds[0].lastTransitionTime == T2


def test_garbage_status_starts_over() -> None:
    assert status.load_federation_status({"phase": "Nope", "extra": 1}) == FederationStatus()
    assert status.load_federation_status({"round": 4, "unknown": "ignored"}).round == 4


def test_report_ignores_unknown_fields() -> None:
    assert report(newField=1).round == 3


# ----------------------------------------------------------------------------------- federated client


def test_client_lifecycle() -> None:
    waiting = status.dump(status.client_waiting({}, status.FEDERATION_NOT_FOUND, "Federation 'x' not found",
                                                generation=1, now=T0))
    assert (cond(waiting, "Ready")["reason"], waiting["joined"]) == (status.FEDERATION_NOT_FOUND, False)
    dep = status.dump(status.client_deployed(waiting, generation=1, selector="a=b", replicas=0, now=T1))
    assert (dep["selector"], dep["replicas"], cond(dep, "Ready")["reason"]) == ("a=b", 0, status.NOT_JOINED)
    silo = report().silos["hospital-a"]
    joined = status.dump(status.client_observed(dep, silo, replicas=2, now=T2))
    assert (joined["joined"], joined["roundsParticipated"], joined["lastUpdateTime"], joined["replicas"]) == (
        True, 3, T1, 2)
    assert (cond(joined, "Ready")["status"], cond(joined, "Ready")["reason"]) == ("True", status.JOINED)
    assert status.client_events(dep, joined) == [status.Event("Normal", "Joined", "the silo joined its federation")]
    flagged = status.dump(status.client_observed(joined, silo.model_copy(update={"flagged": True}), replicas=2,
                                                 now=T2))
    assert cond(flagged, "Degraded")["reason"] == status.FLAGGED
    assert [e.reason for e in status.client_events(joined, flagged)] == [status.FLAGGED]
    unseen = status.dump(status.client_observed(dep, None, replicas=1, now=T2))
    assert cond(unseen, "Ready")["reason"] == status.NOT_JOINED
    lost = status.dump(status.client_unreachable(joined, "refused", replicas=2, now=T2))
    assert cond(lost, "Ready")["status"] == "Unknown" and lost["joined"] is True
    redeployed = status.dump(status.client_deployed(joined, generation=2, selector="a=b", replicas=2, now=T2))
    assert cond(redeployed, "Ready")["reason"] == status.JOINED
    bad = status.dump(status.client_invalid({}, "spec.replicas: too many", generation=1, now=T0))
    assert cond(bad, "Ready")["reason"] == status.INVALID_SPEC
