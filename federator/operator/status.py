"""Pure functions: observed state -> the status of a Federation or FederatedClient, with conditions.

Inputs are plain data (the current status as stored, the server's `/status` payload, a clock reading);
outputs are the new status as a dict ready for the `/status` subresource, plus the events to post.
The caller writes the status only when `changed()` says so.

Conditions (type / meaning):
  Ready        the Federation serves: children applied and the server answers (False with the reason why)
  Progressing  rounds are being trained (False once finished, failed or invalid)
  Degraded     something needs a person: an invalid spec, a refused change, a failed run, an unreachable server
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from federator.api.models import (
    MAX_FLAGGED_IN_STATUS,
    ClientCounts,
    Condition,
    FederatedClientStatus,
    FederationStatus,
)
from federator.api.serverstatus import ServerStatus, SiloStatus

ConditionStatus = Literal["True", "False", "Unknown"]

# Reasons (CamelCase, as Kubernetes conditions use them).
INVALID_SPEC = "InvalidSpec"
IMMUTABLE_FIELD = "ImmutableField"
DEPLOYING = "Deploying"
SERVER_STARTING = "ServerStarting"
SERVER_READY = "ServerReady"
SERVER_UNREACHABLE = "ServerUnreachable"
BAD_SERVER_STATUS = "BadServerStatus"
WAITING_FOR_CLIENTS = "WaitingForClients"
TRAINING = "Training"
COMPLETED = "Completed"
TRAINING_FAILED = "TrainingFailed"
AS_EXPECTED = "AsExpected"
FEDERATION_NOT_FOUND = "FederationNotFound"
WAITING_FOR_CREDENTIALS = "WaitingForCredentials"
JOINED = "Joined"
NOT_JOINED = "NotJoined"
FLAGGED = "Flagged"
QUARANTINED = "Quarantined"

TERMINAL_PHASES = ("Succeeded", "Failed")


# ------------------------------------------------------------------------------- the server's report


class BadReport(ValueError):
    """The server answered, but not with a status this operator understands."""


def parse_report(payload: Any) -> ServerStatus:
    """The server's `/status` read with the model the server writes it with (federator/api/serverstatus.py)."""
    try:
        return ServerStatus.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise BadReport(f"{where}: {first['msg']}") from None


# ---------------------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class Event:
    """A Kubernetes event to post about the object."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """Replace one condition; its lastTransitionTime moves only when its status flips."""
    old = next((c for c in conditions if c.type == type_), None)
    since = old.lastTransitionTime if old is not None and old.status == status else now
    new = Condition(
        type=type_, status=status, reason=reason, message=message,
        lastTransitionTime=since, observedGeneration=generation,
    )
    out = [c for c in conditions if c.type != type_] + [new]
    order = {"Ready": 0, "Progressing": 1, "Degraded": 2}
    return sorted(out, key=lambda c: (order.get(c.type, 9), c.type))


def condition(status: Mapping[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def _apply(
    conditions: list[Condition],
    values: dict[str, tuple[ConditionStatus, str, str]],
    *,
    now: str,
    generation: int | None,
) -> list[Condition]:
    for type_, (st, reason, message) in values.items():
        conditions = set_condition(conditions, type_, st, reason, message, now=now, generation=generation)
    return conditions


def _known(model: type[BaseModel], raw: Mapping[str, Any] | None) -> dict[str, Any]:
    fields = model.model_fields
    return {k: v for k, v in (raw or {}).items() if k in fields}


def load_federation_status(raw: Mapping[str, Any] | None) -> FederationStatus:
    """The stored status, leniently: unknown keys dropped, an unreadable status starts over."""
    try:
        return FederationStatus.model_validate(_known(FederationStatus, raw))
    except ValidationError:
        return FederationStatus()


def load_client_status(raw: Mapping[str, Any] | None) -> FederatedClientStatus:
    try:
        return FederatedClientStatus.model_validate(_known(FederatedClientStatus, raw))
    except ValidationError:
        return FederatedClientStatus()


def dump(status: BaseModel) -> dict[str, Any]:
    """The status as written: every field present (None as null), so a merge patch also clears fields."""
    return status.model_dump(mode="json")


def changed(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing `new` would change the stored status (fields the operator does not own ignored)."""
    current = current or {}
    return any(current.get(k) != v for k, v in new.items())


# ---------------------------------------------------------------------------------------- federation


def federation_invalid(
    raw: Mapping[str, Any] | None, message: str, *, generation: int | None, now: str
) -> FederationStatus:
    """The spec cannot be served: nothing was created, a person must fix the named field."""
    st = load_federation_status(raw)
    conditions = _apply(st.conditions, {
        "Ready": ("False", INVALID_SPEC, message),
        "Progressing": ("False", INVALID_SPEC, "the spec is invalid; nothing was created"),
        "Degraded": ("True", INVALID_SPEC, message),
    }, now=now, generation=generation)
    return st.model_copy(update={"observedGeneration": generation, "conditions": conditions})


def federation_refused(
    raw: Mapping[str, Any] | None, message: str, *, generation: int | None, now: str
) -> FederationStatus:
    """A spec change the cluster cannot apply in place: none of it was applied, the run goes on as it was.

    `observedGeneration` stays at the last generation applied; the conditions name the one refused.
    """
    st = load_federation_status(raw)
    conditions = _apply(st.conditions, {
        "Ready": ("False", IMMUTABLE_FIELD, message),
        "Degraded": ("True", IMMUTABLE_FIELD, message),
    }, now=now, generation=generation)
    return st.model_copy(update={"conditions": conditions})


def is_refused(raw: Mapping[str, Any] | None) -> bool:
    return (condition(raw, "Ready") or {}).get("reason") == IMMUTABLE_FIELD


def federation_deployed(
    raw: Mapping[str, Any] | None, *, generation: int | None, rounds: int, now: str
) -> FederationStatus:
    """Children applied for this generation; the server's own report decides the rest."""
    st = load_federation_status(raw)
    values: dict[str, tuple[ConditionStatus, str, str]] = {}
    ready = condition(dump(st), "Ready")
    if ready is None or ready.get("reason") in (INVALID_SPEC, IMMUTABLE_FIELD, None):
        values["Ready"] = ("False", DEPLOYING, "children applied; waiting for the server to report")
        values["Progressing"] = ("True", DEPLOYING, "starting the server and the clients")
        values["Degraded"] = ("False", AS_EXPECTED, "")
    conditions = _apply(st.conditions, values, now=now, generation=generation)
    return st.model_copy(update={"observedGeneration": generation, "rounds": rounds, "conditions": conditions})


def federation_observed(raw: Mapping[str, Any] | None, report: ServerStatus, *, now: str) -> FederationStatus:
    """The server answered: copy its progress and derive the conditions from its phase."""
    st = load_federation_status(raw)
    gen = st.observedGeneration
    rounds = st.rounds if st.rounds is not None else report.rounds  # the spec's, once deployed
    progress = f"round {report.round}/{rounds if rounds is not None else '?'}"
    if report.accuracy is not None:
        progress += f", accuracy {report.accuracy:.4f}"
    values: dict[str, tuple[ConditionStatus, str, str]]
    if report.phase == "Pending":
        values = {
            "Ready": ("True", SERVER_READY, "the server is up"),
            "Progressing": ("True", WAITING_FOR_CLIENTS,
                            f"waiting for clients ({report.clients.connected} connected)"),
            "Degraded": ("False", AS_EXPECTED, ""),
        }
    elif report.phase == "Running":
        values = {
            "Ready": ("True", SERVER_READY, "the server is up"),
            "Progressing": ("True", TRAINING, progress),
            "Degraded": ("False", AS_EXPECTED, ""),
        }
    elif report.phase == "Succeeded":
        values = {
            "Ready": ("True", COMPLETED, f"finished: {progress}"),
            "Progressing": ("False", COMPLETED, f"finished: {progress}"),
            "Degraded": ("False", AS_EXPECTED, ""),
        }
    else:
        reason = report.message or "the server reported a failure"
        values = {
            "Ready": ("False", TRAINING_FAILED, reason),
            "Progressing": ("False", TRAINING_FAILED, reason),
            "Degraded": ("True", TRAINING_FAILED, reason),
        }
    if is_refused(dump(st)):  # the refusal stands until a pass applies the spec: only progress moves
        values = {k: v for k, v in values.items() if k == "Progressing"}
    return st.model_copy(update={
        "phase": report.phase,
        "round": report.round,
        "rounds": rounds,
        "accuracy": report.accuracy,
        "loss": report.loss,
        "epsilon": report.epsilon,
        "clients": ClientCounts(ready=report.clients.connected, participants=report.clients.participants),
        "byzantineFlagged": report.byzantineFlagged,
        "flaggedClients": report.flaggedClients[:MAX_FLAGGED_IN_STATUS],
        "compressionRatio": report.compressionRatio,
        "conditions": _apply(st.conditions, values, now=now, generation=gen),
    })


def federation_unreachable(
    raw: Mapping[str, Any] | None, error: str, *, now: str, starting: bool, bad_report: bool = False
) -> FederationStatus:
    """The server did not answer (or answered nonsense). Progress so far is kept.

    While `starting` (within the grace period after a deploy, before the server ever answered) this is
    expected and only Ready says so; afterwards Degraded=True tells a person to look. A finished run is
    left alone: its server may be gone on purpose.
    """
    st = load_federation_status(raw)
    if st.phase in TERMINAL_PHASES or is_refused(dump(st)):
        return st
    gen = st.observedGeneration
    reason = BAD_SERVER_STATUS if bad_report else SERVER_UNREACHABLE
    if starting and not bad_report:
        values: dict[str, tuple[ConditionStatus, str, str]] = {
            "Ready": ("False", SERVER_STARTING, f"waiting for the server: {error}"),
        }
    else:
        values = {
            "Ready": ("False", reason, error),
            "Progressing": ("Unknown", reason, "progress unknown while the server does not answer"),
            "Degraded": ("True", reason, error),
        }
    return st.model_copy(update={"conditions": _apply(st.conditions, values, now=now, generation=gen)})


def federation_events(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Event]:
    """Events for a status change: the phase, and Degraded turning on or off."""
    events: list[Event] = []
    old = old or {}
    old_phase, new_phase = old.get("phase"), new.get("phase")
    if old_phase != new_phase and new_phase is not None and not (old_phase is None and new_phase == "Pending"):
        kind: Literal["Normal", "Warning"] = "Warning" if new_phase == "Failed" else "Normal"
        msg = f"phase {old_phase or 'Pending'} -> {new_phase}"
        if new_phase in TERMINAL_PHASES:
            msg += f" after {new.get('round')} rounds"
            if new.get("accuracy") is not None:
                msg += f", accuracy {new['accuracy']:.4f}"
        events.append(Event(kind, new_phase, msg))
    old_deg, new_deg = condition(old, "Degraded"), condition(new, "Degraded")
    if new_deg is not None and (old_deg or {}).get("status") != new_deg["status"]:
        if new_deg["status"] == "True" and new_deg["reason"] not in (INVALID_SPEC, IMMUTABLE_FIELD):
            events.append(Event("Warning", new_deg["reason"], new_deg.get("message") or new_deg["reason"]))
        elif new_deg["status"] == "False" and old_deg is not None and old_deg.get("status") == "True":
            events.append(Event("Normal", "Recovered", "the server answers again"))
    was = {c.get("client") for c in old.get("flaggedClients") or () if c.get("quarantined")}
    for c in new.get("flaggedClients") or ():
        if c.get("quarantined") and c.get("client") not in was:
            events.append(Event("Warning", QUARANTINED,
                                f"client {c['client']} quarantined: its updates were flagged ({c.get('reason')}) in "
                                f"{c.get('rounds')} rounds, last in round {c.get('lastRound')}"))
    return events


def parse_time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def in_startup_grace(raw: Mapping[str, Any] | None, *, now: str, grace_seconds: float) -> bool:
    """Whether the server may still be starting: it never answered since the last deploy, recently."""
    ready = condition(raw, "Ready")
    if ready is None or ready.get("reason") not in (DEPLOYING, SERVER_STARTING):
        return False
    since = ready.get("lastTransitionTime")
    if not since:
        return True
    return (parse_time(now) - parse_time(since)).total_seconds() < grace_seconds


def should_poll(raw: Mapping[str, Any] | None) -> bool:
    """Whether the status daemon asks the server: not before the children exist, not for a bad spec."""
    ready = condition(raw, "Ready")
    return ready is not None and ready.get("reason") != INVALID_SPEC


# ------------------------------------------------------------------------------------ federated client


def client_invalid(
    raw: Mapping[str, Any] | None, message: str, *, generation: int | None, now: str
) -> FederatedClientStatus:
    st = load_client_status(raw)
    conditions = _apply(st.conditions, {
        "Ready": ("False", INVALID_SPEC, message),
        "Degraded": ("True", INVALID_SPEC, message),
    }, now=now, generation=generation)
    return st.model_copy(update={"observedGeneration": generation, "conditions": conditions})


def client_waiting(
    raw: Mapping[str, Any] | None, reason: str, message: str, *, generation: int | None, now: str
) -> FederatedClientStatus:
    """Not servable yet (its Federation is missing, invalid, or has no credentials yet)."""
    st = load_client_status(raw)
    conditions = _apply(st.conditions, {
        "Ready": ("False", reason, message),
        "Degraded": ("False", AS_EXPECTED, ""),
    }, now=now, generation=generation)
    return st.model_copy(update={"observedGeneration": generation, "conditions": conditions, "joined": False})


def client_deployed(
    raw: Mapping[str, Any] | None, *, generation: int | None, selector: str, replicas: int, now: str
) -> FederatedClientStatus:
    """Its Deployment is applied. `replicas` is what the Deployment reports (the `/scale` status)."""
    st = load_client_status(raw)
    values: dict[str, tuple[ConditionStatus, str, str]] = {}
    ready = condition(dump(st), "Ready")
    if ready is None or ready.get("reason") != JOINED:
        values["Ready"] = ("False", NOT_JOINED, "deployed; waiting for the silo to join its federation")
        values["Degraded"] = ("False", AS_EXPECTED, "")
    return st.model_copy(update={
        "observedGeneration": generation,
        "selector": selector,
        "replicas": replicas,
        "conditions": _apply(st.conditions, values, now=now, generation=generation),
    })


def client_observed(
    raw: Mapping[str, Any] | None, silo: SiloStatus | None, *, replicas: int, now: str
) -> FederatedClientStatus:
    """The federation's server answered; `silo` is its entry for this client (None: never seen)."""
    st = load_client_status(raw)
    gen = st.observedGeneration
    silo = silo or SiloStatus()
    values: dict[str, tuple[ConditionStatus, str, str]] = {
        "Ready": ("True", JOINED, f"joined; {silo.roundsParticipated} rounds participated") if silo.joined
        else ("False", NOT_JOINED, "the server has not seen this silo yet"),
        "Degraded": ("True", FLAGGED, "the server flagged this silo's updates as anomalous") if silo.flagged
        else ("False", AS_EXPECTED, ""),
    }
    return st.model_copy(update={
        "replicas": replicas,
        "joined": silo.joined,
        "roundsParticipated": silo.roundsParticipated,
        "lastUpdateTime": silo.lastUpdateTime,
        "flagged": silo.flagged,
        "conditions": _apply(st.conditions, values, now=now, generation=gen),
    })


def client_unreachable(
    raw: Mapping[str, Any] | None, error: str, *, replicas: int, now: str
) -> FederatedClientStatus:
    st = load_client_status(raw)
    conditions = _apply(st.conditions, {
        "Ready": ("Unknown", SERVER_UNREACHABLE, error),
    }, now=now, generation=st.observedGeneration)
    return st.model_copy(update={"replicas": replicas, "conditions": conditions})


def client_events(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Event]:
    old = old or {}
    events: list[Event] = []
    if new.get("joined") and not old.get("joined"):
        events.append(Event("Normal", JOINED, "the silo joined its federation"))
    if new.get("flagged") and not old.get("flagged"):
        events.append(Event("Warning", FLAGGED, "the server flagged this silo's updates as anomalous"))
    return events
