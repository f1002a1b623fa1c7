"""kube.apply's skip rule: the hash of the desired manifest, and every desired field still in place."""

from __future__ import annotations

import copy
from typing import Any

from federator.operator.kube import applied_hash, covers, is_current, with_applied_hash


def config_map(**data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "default"},
            "data": dict(data)}


def test_the_applied_hash_is_of_the_manifest_without_itself() -> None:
    desired = config_map(a="1")
    sent = with_applied_hash(desired)
    assert desired == config_map(a="1")  # the input is not changed
    assert sent["metadata"]["annotations"] == {"federator.dev/applied-hash": applied_hash(desired)}
    assert applied_hash(sent) == applied_hash(desired)
    assert applied_hash(config_map(a="2")) != applied_hash(desired)


def test_a_live_object_is_current_only_with_the_desired_hash_and_every_desired_field() -> None:
    live = with_applied_hash(config_map(a="1", b="2"))
    live["metadata"]["resourceVersion"] = "9"  # what the server adds does not matter
    assert is_current(live, with_applied_hash(config_map(a="1", b="2")))
    # a field dropped from the desired manifest: the old rule (covers) skipped this apply
    assert covers(live, with_applied_hash(config_map(a="1"))) is False  # (the hash annotation differs too)
    assert covers(live, config_map(a="1")) and not is_current(live, with_applied_hash(config_map(a="1")))
    edited = copy.deepcopy(live)
    edited["data"]["a"] = "by hand"  # drift: same hash, a desired field changed
    assert not is_current(edited, with_applied_hash(config_map(a="1", b="2")))
    unhashed = config_map(a="1", b="2")  # applied by an older operator
    assert not is_current(unhashed, with_applied_hash(config_map(a="1", b="2")))
