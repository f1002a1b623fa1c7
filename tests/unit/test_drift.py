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
