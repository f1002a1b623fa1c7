"""Changes the cluster cannot apply in place to the object that holds the checkpoint, and what to do.

Kubernetes refuses (422) any change to a StatefulSet's spec outside a few fields; its volume claims are
among the immutable ones. Deleting and re-creating the StatefulSet to apply such a change may delete
the checkpoint volume with it, so Federator never does: it refuses the change (`Ready=False,
reason=ImmutableField`, a Warning event) with a message that names the Federation's field and the
migration, and leaves the running server as it is. Pure functions over plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from federator.api.models import Federation
from federator.operator import children
from federator.operator.kube import covers

# What the API server lets change in a StatefulSet's spec (apps/v1 validation, Kubernetes 1.28+).
STATEFULSET_MUTABLE = frozenset(
    {"replicas", "ordinals", "template", "updateStrategy", "persistentVolumeClaimRetentionPolicy", "minReadySeconds"})


@dataclass(frozen=True)
class Refusal:
    """A spec change refused: `field` is the Federation's field, `message` says why and how to migrate."""

    field: str
    message: str


def immutable_changes(live: Mapping[str, Any], desired: Mapping[str, Any]) -> list[str]:
    """The StatefulSet spec fields that `desired` changes and the API server would refuse."""
    live_spec, spec = live.get("spec") or {}, desired.get("spec") or {}
    return sorted(
        f"spec.{key}" for key, value in spec.items()
        if key not in STATEFULSET_MUTABLE and not covers(live_spec.get(key), value)
    )


def _claim_spec(statefulset: Mapping[str, Any]) -> Mapping[str, Any]:
    templates = (statefulset.get("spec") or {}).get("volumeClaimTemplates") or [{}]
    return templates[0].get("spec") or {}


def _orphan_delete(fed: Federation) -> str:
    return (f"`kubectl delete statefulset {children.server_name(fed.metadata.name)} -n {fed.metadata.namespace} "
            f"--cascade=orphan`: the operator re-creates it around the same pod and claim")


def refuse_statefulset_change(fed: Federation, live: Mapping[str, Any], desired: Mapping[str, Any]) -> Refusal | None:
    """Why the server StatefulSet cannot become `desired` in place, or None when it can."""
    changes = immutable_changes(live, desired)
    if not changes:
        return None
    name, ns = fed.metadata.name, fed.metadata.namespace
    claim = children.checkpoint_claim_name(name)
    if changes != ["spec.volumeClaimTemplates"]:
        return Refusal(", ".join(changes), (
            f"{', '.join(changes)} of StatefulSet {children.server_name(name)} cannot change in place (the API "
            f"server forbids it) and Federator never deletes the StatefulSet that holds the checkpoint. "
            f"To migrate: {_orphan_delete(fed)}."))
    old, new = _claim_spec(live), _claim_spec(desired)
    old_size = ((old.get("resources") or {}).get("requests") or {}).get("storage")
    new_size = ((new.get("resources") or {}).get("requests") or {}).get("storage")
    if new.get("storageClassName") is not None and old.get("storageClassName") != new["storageClassName"]:
        was = old.get("storageClassName")
        return Refusal("spec.server.checkpoint.storageClassName", (
            f"spec.server.checkpoint.storageClassName: {was!r} -> {new.get('storageClassName')!r} cannot be "
            f"applied in place: the checkpoint volume {claim} stays as it is. Moving it to another StorageClass "
            f"means copying the volume: copy {children.STATE_DIR} to a claim named {claim} of the new class, "
            f"then {_orphan_delete(fed)}. Or set the field back to {was!r}."))
    return Refusal("spec.server.checkpoint.size", (
        f"spec.server.checkpoint.size: {old_size} -> {new_size} cannot be applied in place (a StatefulSet's "
        f"volume claims are immutable): the checkpoint volume {claim} stays as it is. To migrate: grow the "
        f"claim with `kubectl patch pvc {claim} -n {ns} -p "
        f"'{{\"spec\":{{\"resources\":{{\"requests\":{{\"storage\":\"{new_size}\"}}}}}}}}'` (if its StorageClass "
        f"allows volume expansion), then {_orphan_delete(fed)}. Or set the field back to {old_size}."))


def refuse_checkpoint_removal(fed: Federation) -> Refusal:
    """checkpoint.enabled turned false while the StatefulSet (and its checkpoint volume) exists."""
    name, ns = fed.metadata.name, fed.metadata.namespace
    sts = children.server_name(name)
    return Refusal("spec.server.checkpoint.enabled", (
        f"spec.server.checkpoint.enabled: false would replace the server StatefulSet {sts}, which holds the "
        f"checkpoint volume {children.checkpoint_claim_name(name)}; Federator never deletes it. To migrate: "
        f"`kubectl delete statefulset {sts} -n {ns}` yourself (its claim is kept unless "
        f"checkpoint.whenDeleted is Delete); the operator then starts the server without a checkpoint. "
        f"Or set the field back to true."))


def refuse_api_rejection(fed: Federation, kind: str, name: str, reason: str) -> Refusal:
    """The API server refused (422) a change to a StatefulSet that `immutable_changes` did not foresee."""
    return Refusal(f"{kind} {name}", (
        f"the API server refused the change to {kind} {name}: {reason}. Federator never deletes the "
        f"StatefulSet that holds the checkpoint to apply a change. To migrate: {_orphan_delete(fed)}."))
