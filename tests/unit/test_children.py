"""Pure builders: every child manifest is valid for the oldest and newest Kubernetes we claim, labelled,
owned, restricted, and says exactly what the runtime contract wants."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from federator import tokens
from federator.api.manifest import parse_document
from federator.api.models import FederatedClient, Federation
from federator.operator import children, secrets
from tests.helpers.kubeschema import restricted_problems, validate_upstream

UID = "6f7b2b4e-0000-4000-8000-000000000001"
CLIENT_UID = "6f7b2b4e-0000-4000-8000-000000000002"


def federation(**spec: Any) -> Federation:
    doc: dict[str, Any] = {
        "apiVersion": "federator.dev/v1alpha1", "kind": "Federation",
        "metadata": {"name": "demo", "namespace": "team-a"},
        "spec": {"rounds": 5, **spec},
    }
    return Federation.model_validate(doc)


def client(volume: dict[str, str] | None = None, replicas: int = 1) -> FederatedClient:
    return FederatedClient.model_validate({
        "apiVersion": "federator.dev/v1alpha1", "kind": "FederatedClient",
        "metadata": {"name": "hospital-a", "namespace": "team-a"},
        "spec": {"federationRef": {"name": "demo"}, "replicas": replicas,
                 "data": {"volume": volume or {"persistentVolumeClaim": "data-a"}, "path": "train.npz"}},
    })


VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "no-checkpoint": {"server": {"checkpoint": {"enabled": False}}},
    "autoscaling": {"clients": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8,
                                                "targetAverageValue": 0.5}}},
    "resources": {
        "server": {"template": {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                                              "limits": {"memory": "2Gi"}}, "env": {"A": "1"}},
                   "serviceType": "LoadBalancer", "checkpoint": {"storageClassName": "fast", "size": "5Gi"}},
        "clients": {"template": {"image": "example.org/custom:1", "imagePullPolicy": "Always"}},
    },
    "residuals-empty-dir": {"compression": {"uplink": {"topK": 0.01, "bits": 8, "errorFeedback": True,
                                                       "residuals": {"sizeLimit": "2Gi"}}}},
    "residuals-claim": {"compression": {"uplink": {"topK": 0.01, "errorFeedback": True,
                                                   "residuals": {"persistentVolumeClaim": "rwx-residuals"}}}},
}


def all_children(fed: Federation) -> list[dict[str, Any]]:
    desired = children.federation_children(fed, UID, service_monitor_api=True)
    creds = secrets.desired_credentials({}, ["hospital-a"], dns_names=children.credential_dns_names(fed),
                                        tls=lambda names: {"ca.crt": "C", "tls.crt": "T", "tls.key": "K"})
    owner = children.federation_owner(fed, UID)
    silo = children.silo_deployment(client(), children.client_owner(client(), CLIENT_UID), fed)
    return [*desired.apply, children.credentials_secret(fed, owner, creds), silo]


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_child_is_valid_for_the_claimed_kubernetes_versions(variant: str) -> None:
    for manifest in all_children(federation(**VARIANTS[variant])):
        if manifest["kind"] == "ServiceMonitor":  # a CRD: not in the upstream schemas
            assert manifest["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        validate_upstream(manifest)


@pytest.mark.parametrize("variant", VARIANTS)
def test_children_are_labelled_owned_and_restricted(variant: str) -> None:
    fed = federation(**VARIANTS[variant])
    for manifest in all_children(fed):
        meta = manifest["metadata"]
        assert meta["namespace"] == "team-a"
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "federator"
        assert labels["app.kubernetes.io/instance"] == "demo"
        assert labels["app.kubernetes.io/managed-by"] == "federator"
        assert labels["federator.dev/federation"] == "demo"
        assert labels["app.kubernetes.io/component"]
        [ref] = meta["ownerReferences"]
        assert ref["controller"] is True and ref["blockOwnerDeletion"] is True
        if manifest["metadata"]["name"] == "hospital-a-silo":
            assert (ref["kind"], ref["uid"]) == ("FederatedClient", CLIENT_UID)
        else:
            assert (ref["apiVersion"], ref["kind"], ref["name"], ref["uid"]) == (
                "federator.dev/v1alpha1", "Federation", "demo", UID)
        assert not any(k.startswith(("kopf.", "kubectl.")) for k in meta.get("annotations", {}))
        if manifest["kind"] in ("Deployment", "StatefulSet"):
            assert restricted_problems(pod_spec(manifest)) == []
            selector = manifest["spec"]["selector"]["matchLabels"]
            assert selector.items() <= manifest["spec"]["template"]["metadata"]["labels"].items()
            assert pod_spec(manifest)["automountServiceAccountToken"] is False


def test_every_child_of_the_longest_name_fits_and_is_counted_in_the_name_limit() -> None:
    from federator.api import names

    longest = "x" * names.MAX_NAME_LENGTH
    fed = Federation.model_validate({"apiVersion": "federator.dev/v1alpha1", "kind": "Federation",
                                     "metadata": {"name": longest, "namespace": "team-a"},
                                     "spec": {"rounds": 5, **VARIANTS["autoscaling"]}})
    silo = client().model_copy(update={"metadata": fed.metadata.model_copy(update={"name": "c" * len(longest)})})
    built = [*all_children(fed), children.silo_deployment(silo, children.client_owner(silo, CLIENT_UID), fed)]
    for manifest in built:
        name = manifest["metadata"]["name"]
        assert len(name) - len(longest) <= names.LONGEST_SUFFIX, f"{name}: a suffix names.py does not know"
        assert len(name) <= names.LABEL_VALUE_MAX
        assert all(len(v) <= names.LABEL_VALUE_MAX for v in manifest["metadata"]["labels"].values())
        if manifest["kind"] == "StatefulSet":  # its pods' label controller-revision-hash: <name>-<10 chars>
            assert len(name) + names.STATEFULSET_REVISION_LABEL == names.LABEL_VALUE_MAX


def test_builders_are_deterministic() -> None:
    fed = federation(**VARIANTS["resources"])
    twice = [[m for m in all_children(f) if m["kind"] != "Secret"] for f in (fed, copy.deepcopy(fed))]
    assert twice[0] == twice[1]  # (the Secret's tokens are random: generated once, see below)


def test_server_follows_the_runtime_contract() -> None:
    fed = federation(server={"port": 6000, "metricsPort": 6001})
    sts = children.server_statefulset(fed, children.federation_owner(fed, UID))
    [container] = pod_spec(sts)["containers"]
    assert [container["command"][0], *container["args"]] == [
        "federator", "server", "--config", "/etc/federator/federation.yaml", "--host", "0.0.0.0",
        "--port", "6000", "--metrics-port", "6001", "--state-dir", "/var/lib/federator",
        "--linger-seconds", "-1", "--token-file", "/etc/federator/secret/tokens",
        "--tls-cert", "/etc/federator/secret/tls.crt", "--tls-key", "/etc/federator/secret/tls.key",
    ]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {"/etc/federator", "/var/lib/federator", "/tmp"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "state" not in {v["name"] for v in pod_spec(sts)["volumes"]}  # it comes from the claim
    projected = next(v for v in pod_spec(sts)["volumes"] if v["name"] == "federator")["projected"]["sources"]
    assert projected[0]["configMap"] == {"name": "demo-config",
                                         "items": [{"key": "federation.yaml", "path": "federation.yaml"}]}
    assert {i["path"] for i in projected[1]["secret"]["items"]} == {
        "secret/tokens", "secret/ca.crt", "secret/tls.crt", "secret/tls.key"}

    plain = federation(server={"checkpoint": {"enabled": False}})
    dep = children.server_deployment(plain, children.federation_owner(plain, UID))
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert {"name": "state", "emptyDir": {}} in pod_spec(dep)["volumes"]


def test_checkpoint_picks_the_server_kind_and_prunes_the_other() -> None:
    with_ckpt = children.federation_children(federation(), UID, service_monitor_api=False)
    kinds = [m["kind"] for m in with_ckpt.apply]
    assert "StatefulSet" in kinds and kinds.count("Deployment") == 1  # the worker pool
    assert children.ChildRef("apps/v1", "Deployment", "team-a", "demo-server") in with_ckpt.prune
    without = children.federation_children(
        federation(server={"checkpoint": {"enabled": False}}), UID, service_monitor_api=False)
    assert "StatefulSet" not in [m["kind"] for m in without.apply]
    assert children.ChildRef("apps/v1", "StatefulSet", "team-a", "demo-server") in without.prune


def test_the_checkpoint_volume_is_retained_unless_asked_and_retention_restarts_no_pod() -> None:
    def policy(fed: Federation) -> dict[str, str]:
        sts = children.server_statefulset(fed, children.federation_owner(fed, UID))
        return dict(sts["spec"]["persistentVolumeClaimRetentionPolicy"])

    assert policy(federation()) == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    deleting = federation(server={"checkpoint": {"whenDeleted": "Delete"}})
    assert policy(deleting) == {"whenDeleted": "Delete", "whenScaled": "Retain"}
    assert children.config_hash(deleting) == children.config_hash(federation())  # pods keep running
    assert children.config_hash(federation(server={"checkpoint": {"size": "2Gi"}})) != children.config_hash(
        federation())
    assert children.checkpoint_claim_name("demo") == "state-demo-server-0"


def test_clients_follow_the_runtime_contract() -> None:
    fed = federation(clients={"workers": 3})
    dep = children.clients_deployment(fed, children.federation_owner(fed, UID))
    assert dep["spec"]["replicas"] == 3
    [container] = pod_spec(dep)["containers"]
    assert container["args"] == [
        "client", "--server", "demo-server.team-a.svc:50051", "--config", "/etc/federator/federation.yaml",
        "--token-file", "/etc/federator/secret/worker-token", "--metrics-port", "9090",
        "--tls-ca", "/etc/federator/secret/ca.crt",
    ]
    secret_items = pod_spec(dep)["volumes"][0]["projected"]["sources"][1]["secret"]["items"]
    assert {i["key"] for i in secret_items} == {"worker-token", "ca.crt"}  # never the server's key


def test_silo_follows_the_runtime_contract() -> None:
    fed = federation()
    silo = children.silo_deployment(client(replicas=2), children.client_owner(client(), CLIENT_UID), fed)
    assert silo["metadata"]["name"] == "hospital-a-silo"
    assert silo["spec"]["replicas"] == 2
    [container] = pod_spec(silo)["containers"]
    assert container["args"] == [
        "client", "--server", "demo-server.team-a.svc:50051", "--config", "/etc/federator/federation.yaml",
        "--token-file", "/etc/federator/secret/token-hospital-a", "--metrics-port", "9090",
        "--tls-ca", "/etc/federator/secret/ca.crt",
        "--silo", "hospital-a", "--data", "/data/train.npz", "--format", "npz",
    ]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]
    volumes = {v["name"]: v for v in pod_spec(silo)["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "data-a", "readOnly": True}
    secret_items = volumes["federator"]["projected"]["sources"][1]["secret"]["items"]
    assert {i["key"] for i in secret_items} == {"token-hospital-a", "ca.crt"}
    assert children.silo_selector(client(), "demo") == (
        "app.kubernetes.io/component=silo,app.kubernetes.io/instance=demo,app.kubernetes.io/name=federator,"
        "federator.dev/client=hospital-a,federator.dev/federation=demo")


def test_host_path_silo_is_the_one_restricted_exception() -> None:
    fed = federation()
    host = client(volume={"hostPath": "/mnt/silo"})
    silo = children.silo_deployment(host, children.client_owner(host, CLIENT_UID), fed)
    validate_upstream(silo)
    assert restricted_problems(pod_spec(silo)) == ["volume data: ['hostPath']"]


def test_autoscaling_hands_replicas_to_an_hpa_on_the_pending_task_metric() -> None:
    fed = federation(**VARIANTS["autoscaling"])
    desired = children.federation_children(fed, UID, service_monitor_api=False)
    by_kind = {m["kind"]: m for m in desired.apply}
    hpa = by_kind["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "demo-clients"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["metrics"] == [{"type": "Object", "object": {
        "describedObject": {"apiVersion": "v1", "kind": "Service", "name": "demo-server"},
        "metric": {"name": "federator_pending_tasks"},
        "target": {"type": "AverageValue", "averageValue": "500m"},
    }}]
    workers = next(m for m in desired.apply if m["metadata"]["name"] == "demo-clients" and m["kind"] == "Deployment")
    assert "replicas" not in workers["spec"]

    plain = children.federation_children(federation(), UID, service_monitor_api=False)
    assert "HorizontalPodAutoscaler" not in [m["kind"] for m in plain.apply]
    assert children.ChildRef("autoscaling/v2", "HorizontalPodAutoscaler", "team-a", "demo-clients") in plain.prune


@pytest.mark.parametrize("variant", ["plain", "autoscaling"])
def test_a_finished_federation_has_no_workers_and_no_hpa_but_keeps_its_server(variant: str) -> None:
    fed = federation(**VARIANTS.get(variant, {}))
    running = children.federation_children(fed, UID, service_monitor_api=False)
    done = children.federation_children(fed, UID, service_monitor_api=False, finished=True)
    pool = next(m for m in done.apply if m["kind"] == "Deployment" and m["metadata"]["name"] == "demo-clients")
    assert pool["spec"]["replicas"] == 0
    assert "HorizontalPodAutoscaler" not in [m["kind"] for m in done.apply]
    assert children.ChildRef("autoscaling/v2", "HorizontalPodAutoscaler", "team-a", "demo-clients") in done.prune
    unchanged = {(m["kind"], m["metadata"]["name"]) for m in running.apply} - {
        ("Deployment", "demo-clients"), ("HorizontalPodAutoscaler", "demo-clients")}
    assert all(m in done.apply for m in running.apply if (m["kind"], m["metadata"]["name"]) in unchanged)


@pytest.mark.parametrize(("value", "quantity"), [(2.0, "2"), (0.5, "500m"), (1.25, "1250m"), (10, "10")])
def test_quantity(value: float, quantity: str) -> None:
    assert children.quantity(value) == quantity


def test_service_monitor_only_when_asked_and_available() -> None:
    def kinds(fed: Federation, api: bool) -> list[str]:
        return [m["kind"] for m in children.federation_children(fed, UID, service_monitor_api=api).apply]

    assert "ServiceMonitor" in kinds(federation(), True)
    assert "ServiceMonitor" not in kinds(federation(), False)
    off = federation(monitoring={"serviceMonitor": False})
    assert "ServiceMonitor" not in kinds(off, True)
    assert children.ChildRef("monitoring.coreos.com/v1", "ServiceMonitor", "team-a", "demo-server") in (
        children.federation_children(off, UID, service_monitor_api=True).prune)
    sm = children.service_monitor(federation(), children.federation_owner(federation(), UID))
    assert sm["spec"]["selector"]["matchLabels"] == children.selector_labels("demo", "server")


def test_network_policy_admits_only_clients_and_metrics_readers() -> None:
    fed = federation()
    policy = children.server_network_policy(fed, children.federation_owner(fed, UID))
    grpc, metrics = policy["spec"]["ingress"]
    assert grpc["ports"] == [{"protocol": "TCP", "port": 50051}]
    assert grpc["from"][0]["podSelector"]["matchLabels"] == {"federator.dev/federation": "demo"}
    assert metrics["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert "federator-operator" in metrics["from"][0]["podSelector"]["matchExpressions"][0]["values"]


def test_config_map_holds_the_whole_manifest() -> None:
    fed = federation(clients={"count": 6, "perRound": 4})
    cm = children.config_map(fed, children.federation_owner(fed, UID))
    doc = yaml.safe_load(cm["data"]["federation.yaml"])
    assert doc["metadata"] == {"name": "demo", "namespace": "team-a"}
    assert parse_document(doc).obj == fed  # the runtime reads back exactly what was validated


def test_config_hash_ignores_scaling_but_not_training() -> None:
    base = children.config_hash(federation())
    assert children.config_hash(federation(clients={"workers": 7})) == base
    assert children.config_hash(federation(clients={"autoscaling": {"enabled": True}})) == base
    assert children.config_hash(federation(rounds=6)) != base
    fed = federation(clients={"workers": 7})
    dep = children.clients_deployment(fed, children.federation_owner(fed, UID))
    assert dep["spec"]["template"]["metadata"]["annotations"]["federator.dev/config-hash"] == base


# ------------------------------------------------------------------------------------------ secrets


def test_credentials_are_generated_once_and_kept() -> None:
    names = children.credential_dns_names(federation())
    first = secrets.desired_credentials({}, ["b", "a"], dns_names=names)
    assert tokens.loads(first["tokens"]) == tokens.Tokens((first["worker-token"],),
                                                          {"a": first["token-a"], "b": first["token-b"]})
    again = secrets.desired_credentials(first, ["a", "b"], dns_names=names,
                                        tls=lambda _: pytest.fail("TLS regenerated"),
                                        token=lambda: pytest.fail("token regenerated"))
    assert again == first
    added = secrets.desired_credentials(first, ["a", "b", "c"], dns_names=names)
    assert {k: added[k] for k in first if k != "tokens"} == {k: v for k, v in first.items() if k != "tokens"}
    assert added["token-c"] and added["token-c"] in added["tokens"]
    pruned = secrets.desired_credentials(added, ["c"], dns_names=names)
    assert "token-a" not in pruned and first["token-a"] not in pruned["tokens"]
    kept = secrets.desired_credentials(added, ["c"], dns_names=names, prune=False)
    assert "token-a" in kept
    revoked = secrets.without_silo(added, "b")
    assert "token-b" not in revoked and added["token-b"] not in revoked["tokens"]


def test_server_certificate_is_signed_by_the_ca_for_the_service_names() -> None:
    names = children.credential_dns_names(federation())
    assert "demo-server.team-a.svc" in names
    tls = secrets.generate_tls(names)
    ca = x509.load_pem_x509_certificate(tls["ca.crt"].encode())
    cert = x509.load_pem_x509_certificate(tls["tls.crt"].encode())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == names
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(tls["tls.key"].encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]


def test_secret_round_trips_through_base64() -> None:
    fed = federation()
    secret = children.credentials_secret(fed, children.federation_owner(fed, UID), {"a": "x\ny", "b": "é"})
    assert children.decode_secret_data(secret) == {"a": "x\ny", "b": "é"}
    assert children.decode_secret_data(None) == {}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_command_parses_with_the_real_cli(variant: str) -> None:
    from federator.cli import build_parser

    parser = build_parser()
    for manifest in all_children(federation(**VARIANTS[variant])):
        if manifest["kind"] not in ("Deployment", "StatefulSet"):
            continue
        [container] = pod_spec(manifest)["containers"]
        assert container["command"] == ["federator"]
        args = parser.parse_args(container["args"])
        mounted = {v["name"]: v for v in pod_spec(manifest)["volumes"]}["federator"]["projected"]["sources"]
        files = {"/etc/federator/" + i["path"] for src in mounted for i in next(iter(src.values()))["items"]}
        for path in (args.config, args.token_file, getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
                     getattr(args, "tls_ca", None)):
            assert path is None or path in files, f"{manifest['metadata']['name']}: {path} is not mounted"


# ------------------------------------------------------------------------------------ residual volumes

EF = {"topK": 0.01, "bits": 8, "errorFeedback": True}


def residual_parts(manifest: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """The residual volume, its mount and FEDERATOR_RESIDUAL_DIR of a client pod (None where absent)."""
    spec = pod_spec(manifest)
    [container] = spec["containers"]
    volume = next((v for v in spec["volumes"] if v["name"] == children.RESIDUAL_VOLUME), None)
    mount = next((m for m in container["volumeMounts"] if m["name"] == children.RESIDUAL_VOLUME), None)
    env = {e["name"]: e["value"] for e in container["env"]}
    return volume, mount, env.get("FEDERATOR_RESIDUAL_DIR")


def test_without_error_feedback_client_pods_get_no_residual_volume() -> None:
    for fed in (federation(), federation(compression={"uplink": {"topK": 0.01, "bits": 8}})):
        assert residual_parts(children.clients_deployment(fed, children.federation_owner(fed, UID))) == (
            None, None, None)
        silo = client()
        assert residual_parts(children.silo_deployment(silo, children.client_owner(silo, CLIENT_UID), fed)) == (
            None, None, None)


def test_error_feedback_keeps_the_pools_residuals_on_an_empty_dir_by_default() -> None:
    fed = federation(compression={"uplink": EF})
    volume, mount, directory = residual_parts(children.clients_deployment(fed, children.federation_owner(fed, UID)))
    assert volume == {"name": "residuals", "emptyDir": {}}
    assert mount == {"name": "residuals", "mountPath": "/var/lib/federator/residuals"}  # writable, not readOnly
    assert directory == f"/var/lib/federator/residuals/{UID}"  # a Federation made again starts its own

    sized = federation(compression={"uplink": {**EF, "residuals": {"sizeLimit": "3Gi"}}})
    volume, _, _ = residual_parts(children.clients_deployment(sized, children.federation_owner(sized, UID)))
    assert volume == {"name": "residuals", "emptyDir": {"sizeLimit": "3Gi"}}


def test_a_named_claim_holds_the_pools_residuals_across_pod_replacement() -> None:
    fed = federation(compression={"uplink": {**EF, "residuals": {"persistentVolumeClaim": "rwx-residuals"}}})
    dep = children.clients_deployment(fed, children.federation_owner(fed, UID))
    volume, mount, directory = residual_parts(dep)
    assert volume == {"name": "residuals", "persistentVolumeClaim": {"claimName": "rwx-residuals"}}
    assert mount is not None and not mount.get("readOnly")
    assert directory == f"/var/lib/federator/residuals/{UID}"
    validate_upstream(dep)
    assert restricted_problems(pod_spec(dep)) == []
    # the claim is the user's: the operator never creates (or prunes, or deletes) it
    desired = children.federation_children(fed, UID, service_monitor_api=True)
    assert "PersistentVolumeClaim" not in {m["kind"] for m in desired.apply}
    assert "PersistentVolumeClaim" not in {r.kind for r in desired.prune}
    # and a changed volume rolls the pool (its pod template changes)
    other = federation(compression={"uplink": {**EF, "residuals": {"persistentVolumeClaim": "other"}}})
    assert (children.clients_deployment(other, children.federation_owner(other, UID))["spec"]["template"]
            != dep["spec"]["template"])


def test_a_users_own_residual_dir_wins() -> None:
    fed = federation(compression={"uplink": EF},
                     clients={"template": {"env": {"FEDERATOR_RESIDUAL_DIR": "/var/lib/federator/residuals/x"}}})
    _, _, directory = residual_parts(children.clients_deployment(fed, children.federation_owner(fed, UID)))
    assert directory == "/var/lib/federator/residuals/x"
    [container] = pod_spec(children.clients_deployment(fed, children.federation_owner(fed, UID)))["containers"]
    names = [e["name"] for e in container["env"]]
    assert names == sorted(names) and len(names) == len(set(names))


def test_a_silo_keeps_its_residual_on_its_own_volume() -> None:
    """A silo's residual comes from its private data: its own claim or an emptyDir, never the pool's claim."""
    fed = federation(compression={"uplink": {**EF, "residuals": {"persistentVolumeClaim": "pool-rwx"}}})
    plain = client()
    volume, mount, directory = residual_parts(
        children.silo_deployment(plain, children.client_owner(plain, CLIENT_UID), fed))
    assert volume == {"name": "residuals", "emptyDir": {}}
    assert mount == {"name": "residuals", "mountPath": "/var/lib/federator/residuals"}
    assert directory == f"/var/lib/federator/residuals/{CLIENT_UID}"

    own = FederatedClient.model_validate({**plain.model_dump(mode="json", exclude_none=True), "spec": {
        **plain.spec.model_dump(mode="json", exclude_none=True), "residuals": {"persistentVolumeClaim": "a-res"}}})
    silo = children.silo_deployment(own, children.client_owner(own, CLIENT_UID), fed)
    volume, _, _ = residual_parts(silo)
    assert volume == {"name": "residuals", "persistentVolumeClaim": {"claimName": "a-res"}}
    validate_upstream(silo)
    assert restricted_problems(pod_spec(silo)) == []
    no_feedback = federation(compression={"uplink": {"topK": 0.01}})  # the silo's claim waits for error feedback
    assert residual_parts(children.silo_deployment(own, children.client_owner(own, CLIENT_UID), no_feedback)) == (
        None, None, None)
