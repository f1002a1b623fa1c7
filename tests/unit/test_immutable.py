"""Which server StatefulSet changes are refused, and what the refusal tells a person to do."""

from __future__ import annotations

import copy
from typing import Any

from federator.api.models import Federation
from federator.operator import children, immutable

UID = "6f7b2b4e-0000-4000-8000-000000000001"


def federation(**server: Any) -> Federation:
    return Federation.model_validate({
        "apiVersion": "federator.dev/v1alpha1", "kind": "Federation",
        "metadata": {"name": "demo", "namespace": "team-a"}, "spec": {"rounds": 5, "server": server},
    })


def statefulset(fed: Federation) -> dict[str, Any]:
    return children.server_statefulset(fed, children.federation_owner(fed, UID))


def as_stored(sts: dict[str, Any]) -> dict[str, Any]:
    """What the API server keeps: the manifest plus defaults and status."""
    live = copy.deepcopy(sts)
    live["spec"]["revisionHistoryLimit"] = 10
    live["spec"]["volumeClaimTemplates"][0]["spec"]["volumeMode"] = "Filesystem"
    live["status"] = {"replicas": 1}
    return live


def test_changes_to_mutable_fields_or_defaults_are_not_refused() -> None:
    live = as_stored(statefulset(federation()))
    assert immutable.immutable_changes(live, statefulset(federation())) == []
    more_memory = federation(template={"resources": {"limits": {"memory": "2Gi"}}},
                             checkpoint={"whenDeleted": "Delete"})
    assert immutable.refuse_statefulset_change(more_memory, live, statefulset(more_memory)) is None


def test_a_new_checkpoint_size_is_refused_with_the_migration() -> None:
    live = as_stored(statefulset(federation()))
    bigger = federation(checkpoint={"size": "5Gi"})
    assert immutable.immutable_changes(live, statefulset(bigger)) == ["spec.volumeClaimTemplates"]
    refusal = immutable.refuse_statefulset_change(bigger, live, statefulset(bigger))
    assert refusal is not None and refusal.field == "spec.server.checkpoint.size"
    assert refusal.message.startswith("spec.server.checkpoint.size: 1Gi -> 5Gi cannot be applied in place")
    assert ("kubectl patch pvc state-demo-server-0 -n team-a -p "
            "'{\"spec\":{\"resources\":{\"requests\":{\"storage\":\"5Gi\"}}}}'") in refusal.message
    assert "kubectl delete statefulset demo-server -n team-a --cascade=orphan" in refusal.message
    assert refusal.message.endswith("Or set the field back to 1Gi.")


def test_a_new_storage_class_is_refused_with_the_copy_it_needs() -> None:
    live = as_stored(statefulset(federation(checkpoint={"storageClassName": "slow"})))
    fast = federation(checkpoint={"storageClassName": "fast"})
    refusal = immutable.refuse_statefulset_change(fast, live, statefulset(fast))
    assert refusal is not None and refusal.field == "spec.server.checkpoint.storageClassName"
    assert "'slow' -> 'fast'" in refusal.message and "copy /var/lib/federator" in refusal.message


def test_other_immutable_fields_are_named() -> None:
    fed = federation()
    live = as_stored(statefulset(fed))
    live["spec"]["serviceName"] = "renamed"
    refusal = immutable.refuse_statefulset_change(fed, live, statefulset(fed))
    assert refusal is not None and refusal.field == "spec.serviceName"
    assert "--cascade=orphan" in refusal.message


def test_switching_the_checkpoint_off_names_the_volume_kept() -> None:
    refusal = immutable.refuse_checkpoint_removal(federation(checkpoint={"enabled": False}))
    assert refusal.field == "spec.server.checkpoint.enabled"
    assert "state-demo-server-0" in refusal.message and "kubectl delete statefulset demo-server -n team-a" in (
        refusal.message)
