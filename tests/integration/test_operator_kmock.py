"""The real kopf operator (in this event loop) against kmock's KubernetesEmulator over HTTP.

The emulator keeps objects as given plus what `ApiServer` fills in (uid, resourceVersion, generation);
garbage collection, `kubectl scale` and the server's `/status` are simulated by the tests themselves.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import json
from typing import Any

import pytest
import yaml

from federator import tokens
from federator.operator import metrics
from tests.helpers.kubeschema import validate_upstream
from tests.integration.conftest import (
    ApiServer,
    FakeServers,
    OperatorRunner,
    eventually,
    install_service_monitors,
    server_report,
    settle,
    writes,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

NS = "default"
FEDS = "federator.dev/v1alpha1/federations"
FEDCS = "federator.dev/v1alpha1/federatedclients"
FEDS_URL = f"/apis/federator.dev/v1alpha1/namespaces/{NS}/federations"
FEDCS_URL = f"/apis/federator.dev/v1alpha1/namespaces/{NS}/federatedclients"
CHILDREN = {
    ("v1/configmaps", "demo-config"),
    ("v1/secrets", "demo-credentials"),
    ("v1/services", "demo-server"),
    ("apps/v1/statefulsets", "demo-server"),
    ("apps/v1/deployments", "demo-clients"),
    ("policy/v1/poddisruptionbudgets", "demo-clients"),
    ("networking.k8s.io/v1/networkpolicies", "demo-server"),
}
CHILD_PLURALS = {"configmaps", "secrets", "services", "statefulsets", "deployments", "poddisruptionbudgets",
                 "networkpolicies", "horizontalpodautoscalers", "servicemonitors"}


def federation(name: str = "demo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "federator.dev/v1alpha1", "kind": "Federation",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"rounds": 5, "clients": {"count": 10, "perRound": 8, "workers": 2}, **spec},
    }


def federated_client(name: str = "hospital-a", federation: str = "demo", replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "federator.dev/v1alpha1", "kind": "FederatedClient",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"federationRef": {"name": federation}, "replicas": replicas,
                 "data": {"volume": {"persistentVolumeClaim": f"data-{name}"}, "path": "train.npz"}},
    }


def live(api: ApiServer, resource: str, name: str) -> dict[str, Any] | None:
    try:
        obj = api.objects[resource, NS, name]
    except KeyError:
        return None
    return None if obj.deleted else copy.deepcopy(obj.raw)


def must(api: ApiServer, resource: str, name: str) -> dict[str, Any]:
    obj = live(api, resource, name)
    assert obj is not None, f"{resource} {name} does not exist"
    return obj


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


def events(api: ApiServer, name: str) -> list[dict[str, Any]]:
    return [
        r.data for r in api
        if r.resource is not None and r.resource.plural == "events" and r.method == "POST"
        and isinstance(r.data, dict) and r.data.get("involvedObject", {}).get("name") == name
    ]


def child_requests(api: ApiServer, since: int = 0) -> list[Any]:
    """Requests about one child each (kopf's lists and watches of every child kind left out)."""
    return [r for r in list(api)[since:] if r.resource is not None and r.resource.plural in CHILD_PLURALS
            and not (r.method == "GET" and r.name is None)]


def status_writes(api: ApiServer, since: int = 0) -> list[Any]:
    return [r for r in writes(api)[since:] if r.subresource == "status"]


async def create(api: ApiServer, url: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await api.post(url, json=body)
    assert resp.status < 300, await resp.text()
    result: dict[str, Any] = await resp.json()
    return result


async def patch(api: ApiServer, url: str, body: dict[str, Any]) -> None:
    resp = await api.patch(url, data=json.dumps(body), headers={"Content-Type": "application/merge-patch+json"})
    assert resp.status < 300, await resp.text()


# ----------------------------------------------------------------------------------------- creation


async def test_a_federation_gets_every_child_valid_and_owned(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    status_servers.set("demo", server_report("demo", phase="Pending", round=0, rounds=5))
    async with run_operator():
        fed = await create(kube_api, FEDS_URL, federation())
        await eventually(lambda: all(live(kube_api, r, n) for r, n in CHILDREN), message="children")
        await eventually(lambda: condition(live(kube_api, FEDS, "demo"), "Ready").get("status") == "True")
        await settle(kube_api)

    uid = fed["metadata"]["uid"]
    for resource, name in sorted(CHILDREN):
        obj = must(kube_api, resource, name)
        validate_upstream(obj)
        [owner] = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Federation", "demo", uid)
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "federator"
    config = yaml.safe_load(must(kube_api, "v1/configmaps", "demo-config")["data"]["federation.yaml"])
    assert config["spec"]["rounds"] == 5 and config["metadata"]["name"] == "demo"
    secret_keys = set(must(kube_api, "v1/secrets", "demo-credentials")["data"])
    assert secret_keys == {"ca.crt", "tls.crt", "tls.key", "worker-token", "tokens"}
    assert live(kube_api, "autoscaling/v2/horizontalpodautoscalers", "demo-clients") is None
    assert live(kube_api, "apps/v1/deployments", "demo-server") is None  # checkpoint: a StatefulSet

    obj = must(kube_api, FEDS, "demo")
    assert obj["metadata"]["finalizers"] == ["federator.dev/finalizer"]
    assert not any(k.startswith("kopf.zalando.org") for k in obj["metadata"].get("annotations", {}))
    st = obj["status"]
    assert (st["phase"], st["observedGeneration"], st["rounds"]) == ("Pending", 1, 5)
    assert condition(obj, "Progressing")["reason"] == "WaitingForClients"
    assert set(st) <= {"phase", "round", "rounds", "accuracy", "loss", "epsilon", "clients", "byzantineFlagged",
                       "flaggedClients",
                       "compressionRatio", "observedGeneration", "conditions"}  # nothing from kopf
    assert any(e["reason"] == "Reconciled" for e in events(kube_api, "demo"))


async def test_the_events_of_the_operators_own_writes_wake_no_extra_pass(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    """Creating a Federation reads each child as one reconcile pass does (the StatefulSet twice: the
    immutable-field check, then the apply), not once more for every watch event its own writes caused."""
    status_servers.set("demo", server_report("demo"))
    async with run_operator(resync_interval=3600.0):
        await create(kube_api, FEDS_URL, federation())
        await eventually(lambda: all(live(kube_api, r, n) for r, n in CHILDREN), message="children")
        await eventually(lambda: condition(live(kube_api, FEDS, "demo"), "Ready").get("status") == "True")
        await settle(kube_api)
        reads = collections.Counter(
            f"{r.resource.plural}/{r.name}" for r in child_requests(kube_api) if r.method == "GET")
    assert reads["statefulsets/demo-server"] == 2, reads
    assert max(reads.values()) <= 2 and sum(reads.values()) <= len(reads) + 1, reads


async def test_a_restarted_operator_adopts_without_writes(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    status_servers.set("demo", server_report("demo"))
    async with run_operator():
        await create(kube_api, FEDS_URL, federation())
        await eventually(lambda: (live(kube_api, FEDS, "demo") or {}).get("status", {}).get("phase") == "Running")
        await settle(kube_api)
    uids = {key: must(kube_api, *key)["metadata"]["uid"] for key in CHILDREN}
    before_requests, before_writes = len(list(kube_api)), len(writes(kube_api))

    async with run_operator():
        await eventually(lambda: len(child_requests(kube_api, before_requests)) >= len(CHILDREN),
                         message="the resumed reconcile reads the children")
        await asyncio.sleep(0.5)  # several status polls
        await settle(kube_api)

    new_writes = writes(kube_api)[before_writes:]
    assert [(w.method, str(w.url)) for w in new_writes
            if w.resource is not None and w.resource.plural in CHILD_PLURALS] == []
    assert status_writes(kube_api, before_writes) == []  # the status did not change, so it was not written
    assert {key: must(kube_api, *key)["metadata"]["uid"] for key in CHILDREN} == uids


async def test_a_spec_change_patches_children_in_place(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    status_servers.set("demo", server_report("demo"))
    async with run_operator():
        await create(kube_api, FEDS_URL, federation())
        await eventually(lambda: live(kube_api, "apps/v1/deployments", "demo-clients"))
        await settle(kube_api)
        uids = {key: must(kube_api, *key)["metadata"]["uid"] for key in CHILDREN}
        hash_before = must(kube_api, "apps/v1/statefulsets", "demo-server")["spec"]["template"]["metadata"][
            "annotations"]["federator.dev/config-hash"]
        since = len(list(kube_api))

        await patch(kube_api, f"{FEDS_URL}/demo", {"spec": {"rounds": 8, "clients": {"count": 12, "workers": 4}}})
        await eventually(lambda: must(kube_api, "apps/v1/deployments", "demo-clients")["spec"]["replicas"] == 4)
        await eventually(lambda: must(kube_api, FEDS, "demo")["status"]["observedGeneration"] == 2)
        await settle(kube_api)

    config = yaml.safe_load(must(kube_api, "v1/configmaps", "demo-config")["data"]["federation.yaml"])
    assert (config["spec"]["rounds"], config["spec"]["clients"]["count"]) == (8, 12)
    sts = must(kube_api, "apps/v1/statefulsets", "demo-server")
    assert sts["spec"]["template"]["metadata"]["annotations"]["federator.dev/config-hash"] != hash_before
    assert {key: must(kube_api, *key)["metadata"]["uid"] for key in CHILDREN} == uids  # patched, not recreated
    changed = [r for r in child_requests(kube_api, since) if r.method != "GET"]
    assert changed and {r.method for r in changed} == {"PATCH"}  # server-side apply; no DELETE, no POST


async def test_toggles_add_and_prune_optional_children(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    async with run_operator():
        await create(kube_api, FEDS_URL, federation(server={"checkpoint": {"enabled": False}}))
        await eventually(lambda: live(kube_api, "apps/v1/deployments", "demo-server"))
        await patch(kube_api, f"{FEDS_URL}/demo", {"spec": {
            "clients": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 6}},
            "server": {"checkpoint": {"enabled": True}},
        }})
        await eventually(lambda: live(kube_api, "autoscaling/v2/horizontalpodautoscalers", "demo-clients"))
        await eventually(lambda: live(kube_api, "apps/v1/statefulsets", "demo-server"))
        await eventually(lambda: live(kube_api, "apps/v1/deployments", "demo-server") is None)  # (stateless)
        hpa = must(kube_api, "autoscaling/v2/horizontalpodautoscalers", "demo-clients")
        validate_upstream(hpa)
        assert hpa["spec"]["metrics"][0]["object"]["metric"]["name"] == "federator_pending_tasks"
        await patch(kube_api, f"{FEDS_URL}/demo", {"spec": {"clients": {"autoscaling": {"enabled": False}}}})
        await eventually(lambda: live(kube_api, "autoscaling/v2/horizontalpodautoscalers", "demo-clients") is None)
        await settle(kube_api)


# --------------------------------------------------------------------------------- the checkpoint


def reconciles(kind: str, outcome: str) -> float:
    """federator_operator_reconcile_total{kind, outcome} of this process (the operator runs in it)."""
    return float(metrics.RECONCILES.labels(kind, outcome)._value.get())


def deletes_by_the_operator(api: ApiServer, *plurals: str) -> list[str]:
    """DELETE requests of these kinds that the operator sent (it authenticates; the tests do not)."""
    return [str(r.url.path) for r in api if r.method == "DELETE" and r.resource is not None
            and r.resource.plural in plurals and r.headers.get("Authorization")]


def claim_size(sts: dict[str, Any]) -> str:
    return str(sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"])


async def test_a_checkpoint_change_that_cannot_apply_in_place_is_refused_and_nothing_is_deleted(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    status_servers.set("demo", server_report("demo", round=3))
    sts_url = f"/apis/apps/v1/namespaces/{NS}/statefulsets/demo-server"
    refused_before = reconciles("Federation", "immutable_field")
    async with run_operator(resync_interval=3600.0):
        await create(kube_api, FEDS_URL, federation())
        sts = await eventually(lambda: live(kube_api, "apps/v1/statefulsets", "demo-server"))
        assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
        await eventually(lambda: condition(live(kube_api, FEDS, "demo"), "Ready").get("reason") == "ServerReady")
        await settle(kube_api)

        # a bigger checkpoint volume (and more rounds in the same edit): refused as a whole
        await patch(kube_api, f"{FEDS_URL}/demo", {"spec": {"rounds": 8, "server": {"checkpoint": {"size": "5Gi"}}}})
        await eventually(lambda: condition(live(kube_api, FEDS, "demo"), "Ready").get("reason") == "ImmutableField")
        ready = condition(live(kube_api, FEDS, "demo"), "Ready")
        assert ready["status"] == "False" and ready["message"].startswith("spec.server.checkpoint.size: 1Gi -> 5Gi")
        assert "kubectl patch pvc state-demo-server-0" in ready["message"]
        assert "kubectl delete statefulset demo-server -n default --cascade=orphan" in ready["message"]
        assert condition(live(kube_api, FEDS, "demo"), "Degraded")["reason"] == "ImmutableField"
        [warning] = await eventually(lambda: [e for e in events(kube_api, "demo") if e["reason"] == "ImmutableField"],
                                     message="the Warning event (kopf posts events in the background)")
        assert warning["type"] == "Warning" and warning["message"] == ready["message"]
        assert reconciles("Federation", "immutable_field") > refused_before  # the pass counted as refused
        await settle(kube_api)
        kept = must(kube_api, "apps/v1/statefulsets", "demo-server")
        assert (kept["metadata"]["uid"], claim_size(kept)) == (sts["metadata"]["uid"], "1Gi")
        config = yaml.safe_load(must(kube_api, "v1/configmaps", "demo-config")["data"]["federation.yaml"])
        assert config["spec"]["rounds"] == 5  # nothing of the refused spec was applied
        assert must(kube_api, FEDS, "demo")["status"]["observedGeneration"] == 1

        # the server's progress is still reported, and the refusal stands
        status_servers.set("demo", server_report("demo", round=4))
        await eventually(lambda: must(kube_api, FEDS, "demo")["status"]["round"] == 4)
        assert condition(live(kube_api, FEDS, "demo"), "Ready")["reason"] == "ImmutableField"

        # the migration the message names: the person deletes the StatefulSet (orphaning pod and claim)
        resp = await kube_api.delete(sts_url)
        assert resp.status < 300
        await eventually(lambda: (obj := live(kube_api, "apps/v1/statefulsets", "demo-server"))
                         and claim_size(obj) == "5Gi", message="re-created with the new size")
        await eventually(lambda: must(kube_api, FEDS, "demo")["status"]["observedGeneration"] == 2)
        await eventually(lambda: condition(live(kube_api, FEDS, "demo"), "Ready").get("reason") == "ServerReady")

        # switching the checkpoint off would replace the StatefulSet: refused too, until the person deletes it
        await patch(kube_api, f"{FEDS_URL}/demo", {"spec": {"server": {"checkpoint": {"enabled": False}}}})
        await eventually(lambda: condition(live(kube_api, FEDS, "demo"), "Ready").get("message", "").startswith(
            "spec.server.checkpoint.enabled: false would replace the server StatefulSet demo-server"))
        await settle(kube_api)
        assert live(kube_api, "apps/v1/deployments", "demo-server") is None  # never two servers
        assert live(kube_api, "apps/v1/statefulsets", "demo-server") is not None
        resp = await kube_api.delete(sts_url)
        assert resp.status < 300
        await eventually(lambda: live(kube_api, "apps/v1/deployments", "demo-server"), message="the plain server")
        await settle(kube_api)
    assert deletes_by_the_operator(kube_api, "statefulsets", "persistentvolumeclaims") == []


async def test_kube_never_deletes_a_statefulset_even_on_a_422(kube_api: ApiServer, kubeconfig: Any) -> None:
    from federator.operator.kube import ImmutableFieldError, Kube

    sts: dict[str, Any] = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "s", "namespace": NS, "labels": {"app.kubernetes.io/managed-by": "federator"}},
        "spec": {"serviceName": "s", "selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}},
                              "spec": {"containers": [{"name": "c", "image": "i"}]}},
                 "volumeClaimTemplates": [{"metadata": {"name": "state"}, "spec": {
                     "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]},
    }
    kube = Kube.from_environment()
    try:
        assert await kube.apply(sts) == "applied"
        bigger = copy.deepcopy(sts)
        bigger["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] = "5Gi"
        with pytest.raises(ImmutableFieldError, match="Forbidden: updates to statefulset spec"):
            await kube.apply(bigger)  # the emulator answers 422, as the API server does
        with pytest.raises(ValueError, match="never deletes a StatefulSet"):
            await kube.delete("apps/v1", "StatefulSet", NS, "s")
        with pytest.raises(ValueError, match="never deletes a PersistentVolumeClaim"):
            await kube.delete("v1", "PersistentVolumeClaim", NS, "state-s-0")
    finally:
        await kube.close()
    assert claim_size(must(kube_api, "apps/v1/statefulsets", "s")) == "1Gi"
    assert [r for r in kube_api if r.method == "DELETE"] == []


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("spec", "name", "field"), [
    ({"rounds": 5, "clients": {"count": 10, "perRound": 20}}, "demo", "spec.clients"),
    ({"rounds": 5, "data": {"dataset": "npz", "path": "train.npz"}}, "demo", "spec.data.path"),
    ({"rounds": 5}, "a" * 46, "metadata.name"),
], ids=["per-round", "relative-path", "long-name"])
async def test_an_invalid_spec_gets_a_condition_an_event_and_no_children(
    kube_api: ApiServer, run_operator: OperatorRunner, spec: dict[str, Any], name: str, field: str
) -> None:
    async with run_operator():
        doc = federation(name)
        doc["spec"] = spec
        await create(kube_api, FEDS_URL, doc)
        await eventually(lambda: condition(live(kube_api, FEDS, name), "Ready").get("reason") == "InvalidSpec")
        await eventually(lambda: any(e["reason"] == "InvalidSpec" for e in events(kube_api, name)))
        await settle(kube_api)
        ready = condition(live(kube_api, FEDS, name), "Ready")
        assert ready["status"] == "False" and ready["message"].startswith(field), ready["message"]
        [event] = [e for e in events(kube_api, name) if e["reason"] == "InvalidSpec"]
        assert event["type"] == "Warning" and field in event["message"]
        assert child_requests(kube_api) == []  # not even a read: nothing partial
        assert must(kube_api, FEDS, name)["status"]["observedGeneration"] == 1

        if name == "demo":  # fixing the spec brings the children
            await patch(kube_api, f"{FEDS_URL}/{name}", {"spec": {"clients": {"perRound": 5},
                                                                  "data": {"dataset": "digits", "path": None}}})
            await eventually(lambda: live(kube_api, "apps/v1/statefulsets", "demo-server"))
            await eventually(lambda: condition(live(kube_api, FEDS, name), "Ready").get("reason") != "InvalidSpec")


# --------------------------------------------------------------------------------------------- status


async def test_the_server_status_drives_the_federation_status(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    status_servers.set("demo", server_report("demo", phase="Running", round=3, epsilon=0.7, compressionRatio=8.0))
    async with run_operator():
        await create(kube_api, FEDS_URL, federation())
        await eventually(lambda: (live(kube_api, FEDS, "demo") or {}).get("status", {}).get("round") == 3)
        await settle(kube_api)
        st = must(kube_api, FEDS, "demo")["status"]
        assert {k: st[k] for k in ("phase", "round", "accuracy", "loss", "epsilon", "compressionRatio")} == {
            "phase": "Running", "round": 3, "accuracy": 0.81, "loss": 0.52, "epsilon": 0.7, "compressionRatio": 8.0}
        assert st["clients"] == {"ready": 2, "participants": 10}
        assert condition(live(kube_api, FEDS, "demo"), "Progressing")["message"] == "round 3/5, accuracy 0.8100"

        polls, status_count = status_servers.hits[(NS, "demo")], len(status_writes(kube_api))
        await eventually(lambda: status_servers.hits[(NS, "demo")] >= polls + 3, message="polling goes on")
        assert len(status_writes(kube_api)) == status_count  # unchanged status, no write

        status_servers.set("demo", server_report("demo", phase="Succeeded", round=15, accuracy=0.93))
        await eventually(lambda: must(kube_api, FEDS, "demo")["status"]["phase"] == "Succeeded")
        await eventually(lambda: any(e["reason"] == "Succeeded" for e in events(kube_api, "demo")))
    [done] = [e for e in events(kube_api, "demo") if e["reason"] == "Succeeded"]
    assert done["message"] == "phase Running -> Succeeded after 15 rounds, accuracy 0.9300"
    assert any(e["reason"] == "Running" for e in events(kube_api, "demo"))
    assert condition(live(kube_api, FEDS, "demo"), "Progressing")["reason"] == "Completed"


async def test_a_finished_federation_scales_its_worker_pool_to_zero_and_back_through_a_failed_call(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    auto = {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}}
    spec = federation(clients={"count": 10, "perRound": 8, "workers": 2, **auto})
    pool_path = f"/apis/apps/v1/namespaces/{NS}/deployments/demo-clients"

    def replicas() -> int:
        return int(must(kube_api, "apps/v1/deployments", "demo-clients")["spec"]["replicas"])

    status_servers.set("demo", server_report("demo", phase="Running", round=3))
    async with run_operator():
        await create(kube_api, FEDS_URL, spec)
        await eventually(lambda: live(kube_api, "autoscaling/v2/horizontalpodautoscalers", "demo-clients"))
        assert "replicas" not in kube_api.last_applied[pool_path]["spec"]  # the HPA owns it while the federation runs
        uid = must(kube_api, "apps/v1/deployments", "demo-clients")["metadata"]["uid"]

        status_servers.set("demo", server_report("demo", phase="Succeeded", round=15))
        await eventually(lambda: replicas() == 0, message="worker pool at zero")
        await eventually(lambda: live(kube_api, "autoscaling/v2/horizontalpodautoscalers", "demo-clients") is None,
                         message="HPA gone (it cannot hold zero)")
        assert live(kube_api, "apps/v1/statefulsets", "demo-server") is not None  # the server keeps the result
        await settle(kube_api)

        # rounds raised after the end: the server resumes and runs again, and so does the pool, even though
        # the first write to the pool fails (the next level-triggered pass makes it true)
        kube_api.fail_next("PATCH", pool_path)
        status_servers.set("demo", server_report("demo", phase="Running", round=15, rounds=30))
        await eventually(lambda: live(kube_api, "autoscaling/v2/horizontalpodautoscalers", "demo-clients"),
                         message="HPA back")
        await eventually(lambda: replicas() >= 1, message="the pool is off zero")
        assert kube_api.failures_left("PATCH", pool_path) == 0, "the injected failure was not hit"
        await settle(kube_api)

        # `kubectl scale --replicas=0` while it runs: an HPA never scales up from zero, so the pass restarts
        # the pool at minReplicas and the HPA takes it from there
        await patch(kube_api, pool_path, {"spec": {"replicas": 0}})
        await eventually(lambda: replicas() == 2, message="the pool restarts at minReplicas")
        await settle(kube_api)
    assert must(kube_api, "apps/v1/deployments", "demo-clients")["metadata"]["uid"] == uid  # patched, not recreated


async def test_an_unreachable_server_degrades_and_never_crashes_the_operator(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    status_servers.set("demo", server_report("demo"))
    async with run_operator():
        await create(kube_api, FEDS_URL, federation())
        await eventually(lambda: (live(kube_api, FEDS, "demo") or {}).get("status", {}).get("phase") == "Running")

        status_servers.down("demo")
        await eventually(lambda: condition(live(kube_api, FEDS, "demo"), "Degraded").get("status") == "True")
        degraded = condition(live(kube_api, FEDS, "demo"), "Degraded")
        assert degraded["reason"] == "ServerUnreachable" and "503" in degraded["message"]
        assert must(kube_api, FEDS, "demo")["status"]["round"] == 3  # progress so far is kept
        await eventually(lambda: any(e["reason"] == "ServerUnreachable" for e in events(kube_api, "demo")))

        status_servers.set("demo", '{"phase": "Exploding"}')
        await eventually(lambda: condition(live(kube_api, FEDS, "demo"), "Degraded").get("reason")
                         == "BadServerStatus")

        status_servers.set("demo", server_report("demo", round=4))
        await eventually(lambda: condition(live(kube_api, FEDS, "demo"), "Degraded").get("status") == "False")
        assert must(kube_api, FEDS, "demo")["status"]["round"] == 4


async def test_deleting_a_federation_stops_its_status_and_releases_it(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    status_servers.set("demo", server_report("demo"))
    async with run_operator():
        await create(kube_api, FEDS_URL, federation())
        await eventually(lambda: (live(kube_api, FEDS, "demo") or {}).get("status", {}).get("phase") == "Running")
        resp = await kube_api.delete(f"{FEDS_URL}/demo")
        assert resp.status < 300
        await eventually(lambda: live(kube_api, FEDS, "demo") is None, message="the finalizer is released")
        hits = status_servers.hits[(NS, "demo")]
        # garbage collection, as the API server would do it for ownerReferences
        for resource, name in CHILDREN:
            await kube_api.delete(f"/{'api' if resource.startswith('v1') else 'apis'}/"
                                  f"{resource.rsplit('/', 1)[0]}/namespaces/{NS}/{resource.rsplit('/', 1)[1]}/{name}")
        await asyncio.sleep(0.4)
        assert status_servers.hits[(NS, "demo")] <= hits + 1  # the status daemon has stopped
        await create(kube_api, FEDS_URL, federation("other"))  # and the operator still works
        await eventually(lambda: live(kube_api, "apps/v1/statefulsets", "other-server"))
        await settle(kube_api)


# ------------------------------------------------------------------------------------- drift repair


def url_of(resource: str, name: str) -> str:
    group_version, plural = resource.rsplit("/", 1)
    root = "api" if group_version == "v1" else "apis"
    return f"/{root}/{group_version}/namespaces/{NS}/{plural}/{name}"


def discovery_reads(api: ApiServer) -> int:
    """How often the operator asked whether the cluster serves ServiceMonitors (once per resync pass)."""
    return sum(r.method == "GET" and r.url.path == "/apis/monitoring.coreos.com/v1" for r in api)


def first_container(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(obj["spec"]["template"]["spec"]["containers"][0])


# (resource, name, a merge patch a person might apply by hand, what it changes)
HAND_EDITS: list[tuple[str, str, dict[str, Any], Any]] = [
    ("v1/configmaps", "demo-config", {"data": {"federation.yaml": "rounds: 1\n"}}, lambda o: o["data"]),
    ("v1/secrets", "demo-credentials", {"data": {"tokens": None}}, lambda o: sorted(o["data"])),
    ("v1/services", "demo-server", {"spec": {"type": "NodePort"}}, lambda o: o["spec"]["type"]),
    ("apps/v1/statefulsets", "demo-server", {"spec": {"replicas": 3}}, lambda o: o["spec"]["replicas"]),
    ("apps/v1/deployments", "demo-clients", {"spec": {"template": {"metadata": {"annotations": {
        "federator.dev/config-hash": "edited"}}}}}, lambda o: o["spec"]["template"]["metadata"]["annotations"]),
    ("autoscaling/v2/horizontalpodautoscalers", "demo-clients", {"spec": {"maxReplicas": 50}},
     lambda o: o["spec"]["maxReplicas"]),
    ("policy/v1/poddisruptionbudgets", "demo-clients", {"spec": {"maxUnavailable": 5}},
     lambda o: o["spec"]["maxUnavailable"]),
    ("networking.k8s.io/v1/networkpolicies", "demo-server", {"spec": {"policyTypes": ["Egress"]}},
     lambda o: o["spec"]["policyTypes"]),
    ("monitoring.coreos.com/v1/servicemonitors", "demo-server", {"spec": {"endpoints": []}},
     lambda o: o["spec"]["endpoints"]),
    ("apps/v1/deployments", "hospital-a-silo", {"spec": {"replicas": 5}}, lambda o: o["spec"]["replicas"]),
]


async def test_every_kind_of_child_deleted_or_edited_by_hand_is_restored(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    """Repaired through the watches on children (the periodic resync is an hour away here)."""
    install_service_monitors(kube_api)
    status_servers.set("demo", server_report("demo"))
    auto = {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}}
    async with run_operator(resync_interval=3600.0):
        await create(kube_api, FEDS_URL, federation(clients={"count": 10, "perRound": 8, **auto}))
        await create(kube_api, FEDCS_URL, federated_client())
        await eventually(lambda: all(live(kube_api, r, n) for r, n, _, _ in HAND_EDITS), message="every child")
        await settle(kube_api)
        before = {(r, n): must(kube_api, r, n) for r, n, _, _ in HAND_EDITS}
        views = {(r, n): view for r, n, _, view in HAND_EDITS}

        def now_as_before(key: tuple[str, str]) -> bool:
            obj = live(kube_api, *key)
            return obj is not None and views[key](obj) == views[key](before[key])

        for resource, name, edit, _ in HAND_EDITS:  # all at once: repairs coalesce into a few passes
            await patch(kube_api, url_of(resource, name), edit)
            assert not now_as_before((resource, name)), f"the edit of {resource} changed nothing"
        await eventually(lambda: [key for key in before if not now_as_before(key)] == [], timeout=30,
                         message="every child edited by hand is restored")

        for resource, name, _, _ in HAND_EDITS:
            resp = await kube_api.delete(url_of(resource, name))
            assert resp.status < 300

        def recreated(key: tuple[str, str]) -> bool:
            obj = live(kube_api, *key)
            return obj is not None and obj["metadata"]["uid"] != before[key]["metadata"]["uid"]

        await eventually(lambda: [key for key in before if not recreated(key)] == [], timeout=30,
                         message="every child deleted by hand is re-created")
        for key, old in before.items():
            restored = must(kube_api, *key)
            assert restored["metadata"]["ownerReferences"] == old["metadata"]["ownerReferences"]
            if key[0] != "v1/secrets":  # (a re-created Secret holds new credentials)
                assert now_as_before(key), f"{key} came back different"
        await settle(kube_api)
    about_children = [e for e in (r.data for r in kube_api if r.resource is not None and r.method == "POST"
                                  and r.resource.plural == "events")
                      if e["involvedObject"]["kind"] not in ("Federation", "FederatedClient")]
    assert about_children == []  # watching children posts nothing about them


async def test_a_field_dropped_from_the_spec_is_removed_from_the_child(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    status_servers.set("demo", server_report("demo"))
    limited = {"template": {"resources": {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}}}
    async with run_operator():
        await create(kube_api, FEDS_URL, federation(server=limited))
        sts = await eventually(lambda: live(kube_api, "apps/v1/statefulsets", "demo-server"))
        assert first_container(sts)["resources"] == {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}
        await patch(kube_api, f"{FEDS_URL}/demo", {"spec": {"server": {"template": {"resources": {"limits": None}}}}})
        await eventually(lambda: first_container(must(kube_api, "apps/v1/statefulsets", "demo-server"))["resources"]
                         == {"requests": {"cpu": "1"}}, message="limits removed from the StatefulSet")
        await settle(kube_api)


async def test_error_feedback_mounts_a_residual_volume_in_the_pool_in_place_and_never_makes_a_claim(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    status_servers.set("demo", server_report("demo"))

    def residuals(dep: dict[str, Any]) -> tuple[Any, Any]:
        spec = dep["spec"]["template"]["spec"]
        volume = next((v for v in spec["volumes"] if v["name"] == "residuals"), None)
        env = {e["name"]: e["value"] for e in first_container(dep)["env"]}
        return volume, env.get("FEDERATOR_RESIDUAL_DIR")

    async with run_operator():
        fed = await create(kube_api, FEDS_URL, federation(compression={"uplink": {"topK": 0.01, "bits": 8}}))
        dep = await eventually(lambda: live(kube_api, "apps/v1/deployments", "demo-clients"))
        assert residuals(dep) == (None, None)  # no error feedback: nothing to keep
        uid = dep["metadata"]["uid"]
        await patch(kube_api, f"{FEDS_URL}/demo", {"spec": {"compression": {"uplink": {
            "errorFeedback": True, "residuals": {"persistentVolumeClaim": "team-residuals"}}}}})
        await eventually(lambda: residuals(must(kube_api, "apps/v1/deployments", "demo-clients")) == (
            {"name": "residuals", "persistentVolumeClaim": {"claimName": "team-residuals"}},
            f"/var/lib/federator/residuals/{fed['metadata']['uid']}"), message="the claim mounted in the pool")
        await patch(kube_api, f"{FEDS_URL}/demo", {"spec": {"compression": {"uplink": {"residuals": None}}}})
        await eventually(lambda: residuals(must(kube_api, "apps/v1/deployments", "demo-clients"))[0]
                         == {"name": "residuals", "emptyDir": {}}, message="back to an emptyDir")
        await settle(kube_api)
        dep = must(kube_api, "apps/v1/deployments", "demo-clients")
        validate_upstream(dep)
        assert dep["metadata"]["uid"] == uid  # patched in place
    assert [r for r in kube_api if r.resource is not None and r.resource.plural == "persistentvolumeclaims"
            and r.method != "GET"] == []  # the claim is the user's


async def test_a_resync_creates_the_service_monitor_once_its_api_appears(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    status_servers.set("demo", server_report("demo"))
    async with run_operator(resync_interval=0.5):
        await create(kube_api, FEDS_URL, federation())
        await eventually(lambda: all(live(kube_api, r, n) for r, n in CHILDREN), message="children")
        await settle(kube_api)
        assert live(kube_api, "monitoring.coreos.com/v1/servicemonitors", "demo-server") is None
        install_service_monitors(kube_api)  # the Prometheus Operator is installed after the Federation
        monitor = await eventually(lambda: live(kube_api, "monitoring.coreos.com/v1/servicemonitors", "demo-server"),
                                   message="the ServiceMonitor after a resync")
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        await settle(kube_api)
        since_writes = len(writes(kube_api))
        since = discovery_reads(kube_api)
        await eventually(lambda: discovery_reads(kube_api) >= since + 2, message="two more resync passes")
        assert [r for r in writes(kube_api)[since_writes:]
                if r.resource is not None and r.resource.plural in CHILD_PLURALS] == []  # they found nothing to do


# ------------------------------------------------------------------------------------ federated client


async def test_a_federated_client_waits_joins_scales_and_is_revoked(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    waited_before = reconciles("FederatedClient", "temporary_error")
    async with run_operator():
        await create(kube_api, FEDCS_URL, federated_client())
        await eventually(lambda: condition(live(kube_api, FEDCS, "hospital-a"), "Ready").get("reason")
                         == "FederationNotFound")
        await eventually(lambda: reconciles("FederatedClient", "temporary_error") > waited_before,
                         message="the waiting pass counted as a temporary error")
        assert "'demo' not found" in condition(live(kube_api, FEDCS, "hospital-a"), "Ready")["message"]
        assert live(kube_api, "apps/v1/deployments", "hospital-a-silo") is None

        status_servers.set("demo", server_report("demo", silos={
            "hospital-a": {"joined": True, "roundsParticipated": 2, "lastUpdateTime": "2026-01-01T00:00:00Z",
                           "flagged": False}}))
        fed = await create(kube_api, FEDS_URL, federation())
        silo = await eventually(lambda: live(kube_api, "apps/v1/deployments", "hospital-a-silo"))
        validate_upstream(silo)
        assert silo["metadata"]["ownerReferences"][0]["kind"] == "FederatedClient"
        assert "--silo" in silo["spec"]["template"]["spec"]["containers"][0]["args"]
        secret = await eventually(
            lambda: (s := live(kube_api, "v1/secrets", "demo-credentials")) and "token-hospital-a" in s["data"] and s)
        assert secret["metadata"]["ownerReferences"][0]["uid"] == fed["metadata"]["uid"]
        client = await eventually(lambda: (c := live(kube_api, FEDCS, "hospital-a")) and c["status"].get("joined")
                                  and c)
        assert client["status"]["selector"].startswith("app.kubernetes.io/component=silo,")
        assert client["status"]["roundsParticipated"] == 2
        assert condition(client, "Ready")["reason"] == "Joined"

        # `kubectl scale fedc hospital-a --replicas=3` (the /scale subresource writes spec.replicas)
        uid = silo["metadata"]["uid"]
        await patch(kube_api, f"{FEDCS_URL}/hospital-a/scale", {"spec": {"replicas": 3}})
        await eventually(lambda: must(kube_api, "apps/v1/deployments", "hospital-a-silo")["spec"]["replicas"] == 3)
        assert must(kube_api, "apps/v1/deployments", "hospital-a-silo")["metadata"]["uid"] == uid
        # the Deployment controller reports its pods; /scale reads them back from status.replicas
        await patch(kube_api, f"/apis/apps/v1/namespaces/{NS}/deployments/hospital-a-silo/status",
                    {"status": {"replicas": 3, "readyReplicas": 3}})
        await eventually(lambda: must(kube_api, FEDCS, "hospital-a")["status"]["replicas"] == 3)

        resp = await kube_api.delete(f"{FEDCS_URL}/hospital-a")
        assert resp.status < 300
        await eventually(lambda: live(kube_api, FEDCS, "hospital-a") is None)
        secret = must(kube_api, "v1/secrets", "demo-credentials")
        assert "token-hospital-a" not in secret["data"]
        await settle(kube_api)


async def test_the_federation_adds_tokens_for_its_clients(
    kube_api: ApiServer, run_operator: OperatorRunner
) -> None:
    async with run_operator():
        await create(kube_api, FEDCS_URL, federated_client("a"))
        await create(kube_api, FEDCS_URL, federated_client("b"))
        await create(kube_api, FEDCS_URL, federated_client("other", federation="elsewhere"))
        await create(kube_api, FEDS_URL, federation())
        await eventually(lambda: live(kube_api, "apps/v1/deployments", "a-silo")
                         and live(kube_api, "apps/v1/deployments", "b-silo"))
        # ("other" waits for its Federation, retrying: the operator is never quiet here)
        data = await eventually(lambda: (s := live(kube_api, "v1/secrets", "demo-credentials"))
                                and {"token-a", "token-b"} <= set(s["data"]) and s["data"])
        assert condition(live(kube_api, FEDCS, "other"), "Ready")["reason"] == "FederationNotFound"

    assert {"token-a", "token-b"} <= set(data) and "token-other" not in data
    accepted = tokens.loads(base64.b64decode(data["tokens"]).decode())  # as the server reads it
    assert len(accepted.workers) == 1 and set(accepted.silos) == {"a", "b"}
    assert accepted.silos["a"] == base64.b64decode(data["token-a"]).decode()  # bound to its silo
    assert live(kube_api, "apps/v1/deployments", "other-silo") is None


# ------------------------------------------------------------------------------------------- kube.py


async def test_kube_applies_once_and_never_touches_foreign_objects(kube_api: ApiServer, kubeconfig: Any) -> None:
    from federator.operator.kube import ForeignObjectError, Kube, covers

    kube = Kube.from_environment()
    try:
        cm: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "x", "namespace": NS, "labels": {"app.kubernetes.io/managed-by": "federator"}},
              "data": {"a": "1"}}
        assert await kube.apply(cm) == "applied"
        assert await kube.apply(cm) == "unchanged"
        assert kube.requests == {"GET": 2, "PATCH": 1}
        assert await kube.apply({**cm, "data": {"a": "2", "b": "3"}}) == "applied"
        assert must(kube_api, "v1/configmaps", "x")["data"] == {"a": "2", "b": "3"}
        assert await kube.apply({**cm, "data": {"a": "2"}}) == "applied"  # a dropped field is applied too...
        assert must(kube_api, "v1/configmaps", "x")["data"] == {"a": "2"}  # ...and server-side apply removes it
        await patch(kube_api, f"/api/v1/namespaces/{NS}/configmaps/x", {"data": {"a": "by hand"}})
        assert await kube.apply({**cm, "data": {"a": "2"}}) == "applied"  # drift is applied back
        assert await kube.apply({**cm, "data": {"a": "2"}}) == "unchanged"

        await create(kube_api, f"/api/v1/namespaces/{NS}/configmaps",
                     {"metadata": {"name": "theirs", "namespace": NS}, "data": {"b": "1"}})
        with pytest.raises(ForeignObjectError):
            await kube.apply({**cm, "metadata": {**cm["metadata"], "name": "theirs"}})
        assert not await kube.delete_if_managed("v1", "ConfigMap", NS, "theirs")
        assert must(kube_api, "v1/configmaps", "theirs")["data"] == {"b": "1"}
        assert await kube.delete_if_managed("v1", "ConfigMap", NS, "x")
        assert await kube.get("v1", "ConfigMap", NS, "x") is None
        assert not await kube.has_resource("monitoring.coreos.com/v1", "servicemonitors")
        assert await kube.has_resource("federator.dev/v1alpha1", "federations")
    finally:
        await kube.close()
    assert covers({"a": [1, {"b": 2, "c": 3}], "d": 1.0}, {"a": [1, {"b": 2}], "d": 1})
    assert not covers({"a": [1]}, {"a": [1, 2]})
    assert not covers({"a": True}, {"a": 1})


async def test_the_federator_operator_command_runs_the_operator(kube_api: ApiServer, kubeconfig: Any) -> None:
    """`federator operator` as a process (kubeconfig from $KUBECONFIG), with its liveness endpoint."""
    import os
    import socket
    import sys

    import aiohttp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await create(kube_api, FEDS_URL, federation())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federator", "operator", "--all-namespaces", "--liveness", f"http://127.0.0.1:{port}/healthz",
        "--metrics-port", "-1",  # tests/integration/test_operator_metrics.py scrapes it
        env={**os.environ, "FEDERATOR_STATUS_INTERVAL": "0.2"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await eventually(lambda: live(kube_api, "apps/v1/statefulsets", "demo-server"), timeout=20)
        async with aiohttp.ClientSession() as session:
            async def healthy() -> bool:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False
            for _ in range(100):
                if await healthy():
                    break
                await asyncio.sleep(0.1)
            assert await healthy()
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "Traceback" not in err.decode()


# ---------------------------------------------------------------------------------- scope and peering


async def test_a_namespaced_operator_reconciles_only_its_namespaces(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    status_servers.set("demo", server_report("demo", phase="Pending", round=0, rounds=5))
    outside = federation("outside")
    outside["metadata"]["namespace"] = "team-b"
    async with run_operator(namespaces=[NS]):
        await create(kube_api, FEDS_URL, federation())
        await create(kube_api, "/apis/federator.dev/v1alpha1/namespaces/team-b/federations", outside)
        await eventually(lambda: all(live(kube_api, r, n) for r, n in CHILDREN), message="children in default")
        await settle(kube_api)
    in_team_b = {(res.plural, name) for (res, ns, name) in kube_api.objects if ns == "team-b"}
    assert in_team_b == {("federations", "outside")}  # no children there
    untouched = kube_api.objects[FEDS, "team-b", "outside"].raw
    assert "finalizers" not in untouched["metadata"] and "status" not in untouched


PEERING_URL = "/apis/kopf.dev/v1/clusterkopfpeerings"


async def test_a_replica_waits_while_a_higher_priority_peer_is_alive_and_takes_over_when_it_leaves(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    import datetime

    status_servers.set("demo", server_report("demo", phase="Pending", round=0, rounds=5))
    now = datetime.datetime.now(datetime.UTC).isoformat()
    await create(kube_api, PEERING_URL, {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "federator"},
        "status": {"leader@elsewhere": {"priority": 100, "lifetime": 60, "lastseen": now}},
    })

    def peers() -> dict[str, Any]:
        obj = kube_api.objects["kopf.dev/v1/clusterkopfpeerings", None, "federator"].raw
        return dict(obj.get("status") or {})

    async with run_operator(peering="federator", priority=10):
        await eventually(lambda: len(peers()) == 2, message="this replica's keep-alive in the peering")
        ours = next(v for k, v in peers().items() if k != "leader@elsewhere")
        assert ours["priority"] == 10
        await create(kube_api, FEDS_URL, federation())
        await asyncio.sleep(2.0)
        assert not any(live(kube_api, r, n) for r, n in CHILDREN), "a standby replica must not reconcile"
        await patch(kube_api, f"{PEERING_URL}/federator", {"status": {"leader@elsewhere": None}})  # it left
        await eventually(lambda: all(live(kube_api, r, n) for r, n in CHILDREN), message="children after take-over")
        await settle(kube_api)
    assert peers() == {}  # a replica that stops takes itself out of the peering
