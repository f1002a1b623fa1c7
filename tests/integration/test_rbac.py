"""The chart's RBAC is exactly what the operator uses: derived from the real operator's requests to kmock.

The real kopf operator drives a Federation and a FederatedClient through their whole lifecycle (create,
toggle every optional child on and off, scale, delete) against the emulator; every request it sent is
turned into the (apiGroup, resource, verb) that the API server would authorize, and compared with the
rules the chart renders: a rule the operator never needed is as much a failure as a missing one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import kmock
import pytest

from federator.operator import kube
from tests.helpers.chart import by_kind, render
from tests.integration.conftest import ApiServer, FakeServers, OperatorRunner, eventually, server_report, settle

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

NS = "default"
FEDS_URL = f"/apis/federator.dev/v1alpha1/namespaces/{NS}/federations"
FEDCS_URL = f"/apis/federator.dev/v1alpha1/namespaces/{NS}/federatedclients"
SERVICE_MONITORS = "monitoring.coreos.com/v1/servicemonitors"

TEST_AGENT = "rbac-test (as kubectl)"
Grant = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)

# Needed by a real API server but invisible in requests: children carry ownerReferences with
# blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift and
# many hardened clusters) allows only with `update` on the owner's finalizers subresource.
IMPLIED: set[Grant] = {
    ("federator.dev", "federations/finalizers", "update"),
    ("federator.dev", "federatedclients/finalizers", "update"),
}
# A change the API server refuses with 422 (an immutable field) re-creates these kinds: delete. The
# emulator never answers 422, so the path is read from the operator's own table.
IMPLIED |= {(api_version.rpartition("/")[0], plural, "delete")
            for (api_version, kind), plural in kube.PLURALS.items() if kind in kube.RECREATE_ON_IMMUTABLE}


def grants_of(request: kmock.Request) -> set[Grant]:
    """What the API server authorizes for one request (RBAC verbs, not HTTP methods)."""
    assert request.resource is not None
    resource = (request.resource.plural or "") + (f"/{request.subresource}" if request.subresource else "")
    group = request.resource.group or ""
    action = kmock.action
    if request.action == action.WATCH:
        verbs = {"watch"}
    elif request.action == action.LIST:
        verbs = {"list"}
    elif request.action == action.FETCH:
        verbs = {"get"}
    elif request.action == action.CREATE:
        # conftest's ApiServer records a server-side apply that creates as a POST; the API server asks
        # for patch *and* create then
        apply = request.headers.get("Content-Type", "").startswith("application/apply-patch")
        verbs = {"create", "patch"} if apply else {"create"}
    elif request.action == action.UPDATE:
        verbs = {"update"} if request.method == kmock.method.PUT else {"patch"}
    elif request.action == action.DELETE:
        verbs = {"delete"}
    else:
        raise AssertionError(f"unexpected request {request.method} {request.url}")
    return {(group, resource, verb) for verb in verbs}


def requested(api: ApiServer) -> tuple[set[Grant], set[Grant]]:
    """(grants used inside a namespace, grants used cluster-wide) by every API request so far."""
    namespaced: set[Grant] = set()
    cluster: set[Grant] = set()
    for request in api:
        if request.resource is None or request.resource.plural is None:
            continue  # discovery (/api, /apis/...): allowed to every authenticated user
        if request.headers.get("User-Agent") == TEST_AGENT:
            continue  # what the test itself sent, as kubectl would
        (namespaced if request.namespace else cluster).update(grants_of(request))
    return namespaced, cluster


def granted(rules: Iterable[dict[str, Any]]) -> set[Grant]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def table(grants: Iterable[Grant]) -> str:
    return "\n".join(f"  {g or 'core'} {r}: {v}" for g, r, v in sorted(grants))


def compare(rendered: set[Grant], needed: set[Grant], where: str) -> None:
    missing, extra = needed - rendered, rendered - needed
    assert not missing and not extra, (
        f"{where}: the chart's rules differ from what the operator requests\n"
        f"missing (the operator would get 403):\n{table(missing) or '  none'}\n"
        f"not needed (least privilege):\n{table(extra) or '  none'}"
    )


async def send(api: ApiServer, method: str, url: str, body: dict[str, Any] | None = None) -> None:
    content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
    headers = {"User-Agent": TEST_AGENT, "Content-Type": content_type}
    resp = await api.request(method, url, data=None if body is None else json.dumps(body), headers=headers)
    assert resp.status < 300, await resp.text()


def exists(api: ApiServer, resource: str, name: str) -> bool:
    try:
        return not api.objects[resource, NS, name].deleted
    except KeyError:
        return False


async def drive_lifecycle(api: ApiServer, fakes: FakeServers) -> None:
    """Everything the operator does for a Federation and a FederatedClient, start to end."""
    fakes.set("demo", server_report("demo", silos={"hospital-a": {
        "joined": True, "roundsParticipated": 1, "lastUpdateTime": "2026-01-01T00:00:00Z", "flagged": False}}))
    await send(api, "POST", FEDCS_URL, {
        "apiVersion": "federator.dev/v1alpha1", "kind": "FederatedClient",
        "metadata": {"name": "hospital-a", "namespace": NS},
        "spec": {"federationRef": {"name": "demo"}, "replicas": 1,
                 "data": {"volume": {"persistentVolumeClaim": "data-a"}, "path": "train.npz"}}})
    await send(api, "POST", FEDS_URL, {
        "apiVersion": "federator.dev/v1alpha1", "kind": "Federation", "metadata": {"name": "demo", "namespace": NS},
        "spec": {"rounds": 5, "clients": {"count": 10, "perRound": 8, "workers": 2,
                                          "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}},
                 "server": {"checkpoint": {"enabled": False}}, "monitoring": {"serviceMonitor": True}}})
    # optional children that the next change prunes: the HPA, the ServiceMonitor, the stateless server
    pruned = [("autoscaling/v2/horizontalpodautoscalers", "demo-clients"), (SERVICE_MONITORS, "demo-server"),
              ("apps/v1/deployments", "demo-server")]
    await eventually(lambda: all(exists(api, r, n) for r, n in pruned) and exists(api, "apps/v1/deployments",
                     "hospital-a-silo"), timeout=30, message="every child")
    await send(api, "PATCH", f"{FEDS_URL}/demo", {"spec": {
        "clients": {"autoscaling": {"enabled": False}}, "monitoring": {"serviceMonitor": False},
        "server": {"checkpoint": {"enabled": True}}}})
    await eventually(lambda: not any(exists(api, r, n) for r, n in pruned)
                     and exists(api, "apps/v1/statefulsets", "demo-server"), timeout=30, message="pruned")
    await send(api, "PATCH", f"{FEDCS_URL}/hospital-a/scale", {"spec": {"replicas": 2}})
    await eventually(lambda: api.objects["apps/v1/deployments", NS, "hospital-a-silo"]["spec"]["replicas"] == 2,
                     timeout=30, message="scaled")
    await send(api, "DELETE", f"{FEDCS_URL}/hospital-a")
    await eventually(lambda: not exists(api, "federator.dev/v1alpha1/federatedclients", "hospital-a"), timeout=30)
    await send(api, "DELETE", f"{FEDS_URL}/demo")
    await eventually(lambda: not exists(api, "federator.dev/v1alpha1/federations", "demo"), timeout=30)
    await settle(api)


def with_service_monitors(api: ApiServer) -> None:
    api.resources[SERVICE_MONITORS] = kmock.ResourceInfo(
        kind="ServiceMonitor", singular="servicemonitor", namespaced=True,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"})


async def test_the_cluster_role_is_what_an_all_namespaces_operator_uses(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    with_service_monitors(kube_api)
    async with run_operator():
        await drive_lifecycle(kube_api, status_servers)
    namespaced, cluster = requested(kube_api)

    objects = render({})
    assert not by_kind(objects, "Role")
    [cluster_role] = by_kind(objects, "ClusterRole")
    compare(granted(cluster_role["rules"]), namespaced | cluster | IMPLIED, "ClusterRole")


async def test_roles_per_namespace_are_what_a_namespaced_operator_uses(
    kube_api: ApiServer, run_operator: OperatorRunner, status_servers: FakeServers
) -> None:
    with_service_monitors(kube_api)
    async with run_operator(namespaces=[NS]):
        await drive_lifecycle(kube_api, status_servers)
    namespaced, cluster = requested(kube_api)

    objects = render({"watchNamespaces": [NS, "team-b"]})
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == [NS, "team-b"]
    for role in roles:
        compare(granted(role["rules"]), namespaced | IMPLIED, f"Role in {role['metadata']['namespace']}")
    [cluster_role] = by_kind(objects, "ClusterRole")
    compare(granted(cluster_role["rules"]), cluster, "ClusterRole of a namespaced operator")
    bindings = {(b["metadata"]["namespace"], b["roleRef"]["name"]) for b in by_kind(objects, "RoleBinding")}
    assert bindings == {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in roles}
