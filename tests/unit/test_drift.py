"""Which changes to a child wake its owner's resync (pure parts of federator/operator/drift.py)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from federator.operator.drift import Nudges, fingerprint, owner_uids, wanted


def deployment() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "demo-clients", "namespace": "default", "labels": {"a": "1"},
                     "resourceVersion": "7", "generation": 2, "uid": "u-1",
                     "ownerReferences": [
                         {"apiVersion": "federator.dev/v1alpha1", "kind": "Federation", "name": "demo",
                          "uid": "fed-1", "controller": True},
                         {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "cm-1"}]},
        "spec": {"replicas": 2},
        "status": {"replicas": 1},
    }


def test_status_and_server_metadata_do_not_change_the_fingerprint() -> None:
    obj = deployment()
    counted = copy.deepcopy(obj)
    counted["status"] = {"replicas": 2, "readyReplicas": 2}
    counted["metadata"]["resourceVersion"] = "8"
    assert fingerprint(counted) == fingerprint(obj)


@pytest.mark.parametrize("edit", [
    lambda o: o["spec"].update(replicas=5),
    lambda o: o["metadata"]["labels"].update(a="2"),
    lambda o: o["metadata"].setdefault("annotations", {}).update(note="x"),
    lambda o: o.update(data={"k": "v"}),
], ids=["spec", "label", "annotation", "data"])
def test_a_change_a_person_can_make_changes_the_fingerprint(edit: Any) -> None:
    obj = deployment()
    edited = copy.deepcopy(obj)
    edit(edited)
    assert fingerprint(edited) != fingerprint(obj)


def test_only_the_controlling_federator_owner_is_woken() -> None:
    assert owner_uids(deployment()) == ["fed-1"]
    foreign = deployment()
    foreign["metadata"]["ownerReferences"][0]["controller"] = False
    assert owner_uids(foreign) == []
    assert owner_uids({"metadata": {}}) == []


def test_which_events_wake_the_owner() -> None:
    assert wanted("DELETED", "a", "a")  # gone: restore it
    assert not wanted(None, None, "a")  # kopf's initial listing: the owner's resume handler runs anyway
    assert wanted("ADDED", None, "a")  # first seen
    assert wanted("MODIFIED", "a", "b")
    assert not wanted("MODIFIED", "a", "a")  # status only


@pytest.mark.asyncio
async def test_a_nudge_reaches_only_a_registered_owner() -> None:
    nudges = Nudges()
    assert not nudges.nudge("fed-1")
    with nudges.registered("fed-1") as event:
        assert nudges.nudge("fed-1") and event.is_set()
        assert not nudges.nudge("fed-2")
    assert not nudges.nudge("fed-1")  # its daemon has stopped
    await asyncio.sleep(0)


def test_a_child_still_as_the_operator_left_it_wakes_nobody_and_an_edit_or_delete_does() -> None:
    from federator.operator.kube import Connection, Kube, with_applied_hash
    from federator.operator.reconcile import child_changed

    kube, nudges = Kube(Connection(server="http://unused")), Nudges()
    manifest = with_applied_hash({k: v for k, v in deployment().items() if k != "status"})
    kube.remember(manifest)
    memo: dict[str, Any] = {"kube": kube, "nudges": nudges}
    with nudges.registered("fed-1"):
        own_write = copy.deepcopy(manifest) | {"status": {"replicas": 0}}
        own_write["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "1"  # a controller's
        assert child_changed(memo, own_write, "ADDED") == []
        assert child_changed(memo, own_write, "DELETED") == ["fed-1"]
        edited = copy.deepcopy(own_write)
        edited["spec"]["replicas"] = 5
        assert child_changed(memo, edited, "MODIFIED") == ["fed-1"]
        stale = copy.deepcopy(own_write)
        stale["metadata"]["annotations"]["federator.dev/applied-hash"] = "older"
        assert child_changed(memo, stale, "MODIFIED") == ["fed-1"]


def test_the_credentials_secret_is_as_left_only_with_the_same_data_keys() -> None:
    from federator.operator.kube import left_as_written

    written = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "default"},
               "data": {"tokens": "dA==", "ca.crt": "Yw=="}}
    live = copy.deepcopy(written) | {"type": "Opaque"}
    assert left_as_written(live, written)
    assert not left_as_written(live | {"data": {"tokens": "dA=="}}, written)  # a key removed
    assert not left_as_written(live | {"data": {**written["data"], "extra": "eA=="}}, written)  # one added
    assert not left_as_written(live, None)  # never written by this process: the fingerprint decides


def test_an_autoscaled_pool_scaled_to_zero_by_hand_wakes_its_owner_though_its_manifest_covers_it() -> None:
    from federator.operator.kube import Connection, Kube, with_applied_hash
    from federator.operator.reconcile import child_changed

    kube, nudges = Kube(Connection(server="http://unused")), Nudges()
    pool = {k: v for k, v in deployment().items() if k != "status"} | {"spec": {"selector": {}}}  # HPA: replicas
    kube.remember(with_applied_hash(pool))
    memo: dict[str, Any] = {"kube": kube, "nudges": nudges}
    live = with_applied_hash(pool)
    with nudges.registered("fed-1"):
        assert child_changed(memo, live | {"spec": {"selector": {}, "replicas": 3}}, "MODIFIED") == []
        assert child_changed(memo, live | {"spec": {"selector": {}, "replicas": 0}}, "MODIFIED") == ["fed-1"]
