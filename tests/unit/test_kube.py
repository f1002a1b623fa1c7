"""kube.apply's skip rule: the hash of the desired manifest, and every desired field still in place."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from federator.operator.kube import Connection, Kube, applied_hash, covers, is_current, with_applied_hash


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


@pytest.mark.asyncio
async def test_a_closed_client_never_opens_a_new_session() -> None:
    """A handler still running after the operator's cleanup must not leak a fresh aiohttp session."""
    kube = Kube(Connection(server="http://127.0.0.1:9"))
    opened = kube.session
    await kube.close()
    assert opened.closed
    with pytest.raises(RuntimeError, match="the operator is exiting"):
        _ = kube.session
