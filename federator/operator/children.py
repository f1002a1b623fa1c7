"""Pure builders: a validated Federation (or FederatedClient) -> the manifests of its children, as dicts.

Nothing here talks to the API or reads the clock: the same input always gives the same output, so a
reconcile that applies these manifests twice changes nothing the second time. `kube.py` applies them.

Every child carries an ownerReference to its owner and the labels in `labels()`. Pods follow the
`restricted` Pod Security Standard. Names are `<federation>-server`, `<federation>-clients`,
`<federation>-config`, `<federation>-credentials` and `<federatedclient>-silo`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from federator.api import names
from federator.api.models import (
    API_VERSION,
    FederatedClient,
    Federation,
    PodTemplate,
    ResidualVolumeSpec,
)
from federator.operator import secrets

MANAGED_BY = "federator"
APP_NAME = "federator"
FEDERATION_LABEL = "federator.dev/federation"
CLIENT_LABEL = "federator.dev/client"
CONFIG_HASH_ANNOTATION = "federator.dev/config-hash"

CONFIG_DIR = "/etc/federator"
CONFIG_FILE = f"{CONFIG_DIR}/federation.yaml"
SECRET_DIR = f"{CONFIG_DIR}/secret"
STATE_DIR = "/var/lib/federator"
STATE_CLAIM = "state"  # the volume claim template of the server StatefulSet
DATA_DIR = "/data"
RESIDUAL_DIR = "/var/lib/federator/residuals"  # error-feedback residuals of the clients a pod trains
RESIDUAL_VOLUME = "residuals"
CLIENT_METRICS_PORT = 9090
RUN_AS = 10001  # the runtime image's user (runtime/Dockerfile)

# Who may read the server's HTTP port (/metrics, /status): Prometheus and the operator, in any namespace.
METRICS_READERS = ["prometheus", "federator-operator"]


@dataclass(frozen=True)
class Owner:
    """The object that owns a child (the kubernetes client refuses ownerReferences without a uid)."""

    kind: str
    name: str
    uid: str
    api_version: str = API_VERSION

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class ChildRef:
    """A child that may exist and must not: pruned when the spec no longer asks for it."""

    api_version: str
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True)
class Desired:
    """Everything a reconcile pass makes true: manifests to apply, children to delete if they exist."""

    apply: list[dict[str, Any]] = field(default_factory=list)
    prune: list[ChildRef] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- naming


def server_name(federation: str) -> str:
    return f"{federation}{names.SERVER}"


def clients_name(federation: str) -> str:
    return f"{federation}{names.CLIENTS}"


def config_name(federation: str) -> str:
    return f"{federation}{names.CONFIG}"


def secret_name(federation: str) -> str:
    return f"{federation}{names.CREDENTIALS}"


def silo_name(client: str) -> str:
    return f"{client}{names.SILO}"


def checkpoint_claim_name(federation: str) -> str:
    """The PersistentVolumeClaim the server StatefulSet's one pod gets (`<template>-<statefulset>-0`)."""
    return f"{STATE_CLAIM}-{server_name(federation)}-0"


def server_address(federation: str, namespace: str, port: int) -> str:
    return f"{server_name(federation)}.{namespace}.svc:{port}"


# ------------------------------------------------------------------------------------ labels and meta


def selector_labels(federation: str, component: str, client: str | None = None) -> dict[str, str]:
    """The labels a workload selects its pods by (never change: selectors are immutable)."""
    out = {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": federation,
        "app.kubernetes.io/component": component,
        FEDERATION_LABEL: federation,
    }
    if client is not None:
        out[CLIENT_LABEL] = client
    return out


def labels(federation: str, component: str, client: str | None = None) -> dict[str, str]:
    return {**selector_labels(federation, component, client), "app.kubernetes.io/managed-by": MANAGED_BY}


def selector_string(selector: Mapping[str, str]) -> str:
    """A label selector in the text form `/scale` and `kubectl -l` use."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _meta(
    name: str, namespace: str, owner: Owner, lbls: Mapping[str, str], annotations: Mapping[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": dict(lbls),
        "ownerReferences": [owner.reference()],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def federation_owner(fed: Federation, uid: str) -> Owner:
    return Owner(kind="Federation", name=fed.metadata.name, uid=uid)


def client_owner(client: FederatedClient, uid: str) -> Owner:
    return Owner(kind="FederatedClient", name=client.metadata.name, uid=uid)


# ------------------------------------------------------------------------------------------- config


def runtime_config(fed: Federation) -> dict[str, Any]:
    """The Federation manifest the runtime reads: apiVersion, kind, name, namespace, validated spec."""
    return {
        "apiVersion": fed.apiVersion,
        "kind": fed.kind,
        "metadata": {"name": fed.metadata.name, "namespace": fed.metadata.namespace},
        "spec": fed.spec.model_dump(mode="json", exclude_none=True),
    }


def config_text(fed: Federation) -> str:
    # libyaml's emitter when present: the pure-Python one costs ~10 ms per Federation on every reconcile
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump(runtime_config(fed), Dumper=dumper, sort_keys=True)


def config_hash(fed: Federation) -> str:
    """A hash of the runtime config without the scaling and retention fields: a change restarts pods, scaling
    (or keeping the checkpoint volume) does not."""
    config = runtime_config(fed)
    clients = config["spec"].get("clients", {})
    clients.pop("workers", None)
    clients.pop("autoscaling", None)
    config["spec"].get("server", {}).get("checkpoint", {}).pop("whenDeleted", None)  # what Kubernetes does with it
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def config_map(fed: Federation, owner: Owner) -> dict[str, Any]:
    name, ns = fed.metadata.name, fed.metadata.namespace
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(config_name(name), ns, owner, labels(name, "config")),
        "data": {"federation.yaml": config_text(fed)},
    }


def credentials_secret(fed: Federation, owner: Owner, data: Mapping[str, str]) -> dict[str, Any]:
    """The Secret with the CA, the server certificate and the tokens (values given as plain text)."""
    name, ns = fed.metadata.name, fed.metadata.namespace
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(secret_name(name), ns, owner, labels(name, "credentials")),
        "type": "Opaque",
        "data": encode_secret_data(data),
    }


def encode_secret_data(data: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in sorted(data.items())}


def decode_secret_data(secret: Mapping[str, Any] | None) -> dict[str, str]:
    if not secret:
        return {}
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def credential_dns_names(fed: Federation) -> list[str]:
    return secrets.server_dns_names(server_name(fed.metadata.name), fed.metadata.namespace)


# ---------------------------------------------------------------------------------------------- pods


def _resources(template: PodTemplate) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in ("requests", "limits"):
        values = getattr(template.resources, section).model_dump(exclude_none=True)
        if values:
            out[section] = values
    return out


def _env(template: PodTemplate, extra: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    base = {"HOME": "/tmp", "PYTHONUNBUFFERED": "1", **(extra or {})}
    merged = {**base, **template.env}
    return [{"name": k, "value": v} for k, v in sorted(merged.items())]


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _config_volume(federation: str, secret_items: Iterable[str]) -> dict[str, Any]:
    """One projected volume at /etc/federator: federation.yaml and secret/<key> for the chosen keys only.

    (A Secret mounted inside a ConfigMap mount would need a directory in a read-only volume.)
    """
    return {
        "name": "federator",
        "projected": {
            "defaultMode": 0o440,
            "sources": [
                {"configMap": {"name": config_name(federation), "items": [
                    {"key": "federation.yaml", "path": "federation.yaml"}]}},
                {"secret": {"name": secret_name(federation), "items": [
                    {"key": key, "path": f"secret/{key}"} for key in secret_items]}},
            ],
        },
    }


def _pod_spec(
    containers: list[dict[str, Any]], volumes: list[dict[str, Any]], *, grace: int = 30
) -> dict[str, Any]:
    return {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": grace,
        "containers": containers,
        "volumes": volumes,
    }


def _container(
    name: str, template: PodTemplate, args: list[str], mounts: list[dict[str, Any]],
    ports: list[dict[str, Any]], env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": template.image,
        "imagePullPolicy": template.imagePullPolicy,
        "command": ["federator"],
        "args": args,
        "env": _env(template, env),
        "ports": ports,
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    resources = _resources(template)
    if resources:
        container["resources"] = resources
    return container


# -------------------------------------------------------------------------------------------- server


def server_container(fed: Federation) -> dict[str, Any]:
    """gRPC over TLS with the operator's certificate; clients verify it with the CA (never the CA's key)."""
    server = fed.spec.server
    args = [
        "server",
        "--config", CONFIG_FILE,
        "--host", "0.0.0.0",
        "--port", str(server.port),
        "--metrics-port", str(server.metricsPort),
        "--state-dir", STATE_DIR,
        "--linger-seconds", "-1",  # after the last round keep serving /status and STOP until the pod stops
        "--token-file", f"{SECRET_DIR}/{secrets.TOKENS}",
        "--tls-cert", f"{SECRET_DIR}/{secrets.TLS_CERT}",
        "--tls-key", f"{SECRET_DIR}/{secrets.TLS_KEY}",
    ]
    container = _container(
        "server", server.template, args,
        mounts=[
            {"name": "federator", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": STATE_CLAIM, "mountPath": STATE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        ports=[
            {"name": "grpc", "containerPort": server.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": server.metricsPort, "protocol": "TCP"},
        ],
    )
    probe = {"httpGet": {"path": "/healthz", "port": "metrics"}}
    container["readinessProbe"] = {**probe, "periodSeconds": 5, "failureThreshold": 3}
    container["livenessProbe"] = {**probe, "initialDelaySeconds": 15, "periodSeconds": 20, "failureThreshold": 6}
    return container


def _server_pod_template(fed: Federation, *, state_from_claim: bool) -> dict[str, Any]:
    name = fed.metadata.name
    volumes = [
        _config_volume(name, [secrets.TOKENS, secrets.CA_CERT, secrets.TLS_CERT, secrets.TLS_KEY]),
        {"name": "tmp", "emptyDir": {}},
    ]
    if not state_from_claim:
        volumes.append({"name": STATE_CLAIM, "emptyDir": {}})
    return {
        "metadata": {
            "labels": labels(name, "server"),
            "annotations": {CONFIG_HASH_ANNOTATION: config_hash(fed)},
        },
        "spec": _pod_spec([server_container(fed)], volumes),
    }


def server_deployment(fed: Federation, owner: Owner) -> dict[str, Any]:
    """One server pod, replaced (never two at once: `Recreate`), state in an emptyDir."""
    name, ns = fed.metadata.name, fed.metadata.namespace
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(server_name(name), ns, owner, labels(name, "server")),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector_labels(name, "server")},
            "template": _server_pod_template(fed, state_from_claim=False),
        },
    }


def server_statefulset(fed: Federation, owner: Owner) -> dict[str, Any]:
    """One server pod with its checkpoint on a PersistentVolumeClaim, kept when the Federation is deleted
    unless `checkpoint.whenDeleted` says Delete. The claim is `state-<federation>-server-0`."""
    name, ns = fed.metadata.name, fed.metadata.namespace
    checkpoint = fed.spec.server.checkpoint
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": checkpoint.size}},
    }
    if checkpoint.storageClassName:
        claim_spec["storageClassName"] = checkpoint.storageClassName
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(server_name(name), ns, owner, labels(name, "server")),
        "spec": {
            "replicas": 1,
            "serviceName": server_name(name),
            "podManagementPolicy": "OrderedReady",
            "updateStrategy": {"type": "RollingUpdate"},
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": checkpoint.whenDeleted, "whenScaled": "Retain"},
            "selector": {"matchLabels": selector_labels(name, "server")},
            "template": _server_pod_template(fed, state_from_claim=True),
            "volumeClaimTemplates": [
                {"metadata": {"name": STATE_CLAIM, "labels": labels(name, "server")}, "spec": claim_spec}
            ],
        },
    }


def server_service(fed: Federation, owner: Owner) -> dict[str, Any]:
    name, ns = fed.metadata.name, fed.metadata.namespace
    server = fed.spec.server
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(server_name(name), ns, owner, labels(name, "server")),
        "spec": {
            "type": server.serviceType,
            "selector": selector_labels(name, "server"),
            "ports": [
                {"name": "grpc", "port": server.port, "targetPort": "grpc", "protocol": "TCP"},
                {"name": "metrics", "port": server.metricsPort, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


# ------------------------------------------------------------------------------------------- clients


def _client_args(fed: Federation, token_file: str) -> list[str]:
    name, ns = fed.metadata.name, fed.metadata.namespace
    return [
        "client",
        "--server", server_address(name, ns, fed.spec.server.port),
        "--config", CONFIG_FILE,
        "--token-file", token_file,
        "--metrics-port", str(CLIENT_METRICS_PORT),
        "--tls-ca", f"{SECRET_DIR}/{secrets.CA_CERT}",  # the server's name in --server is in its certificate
    ]


def _client_ports() -> list[dict[str, Any]]:
    return [{"name": "metrics", "containerPort": CLIENT_METRICS_PORT, "protocol": "TCP"}]


@dataclass(frozen=True)
class ResidualMount:
    """What a client pod needs to keep error-feedback residuals on a volume: a volume, its mount, the env."""

    volume: dict[str, Any]
    mount: dict[str, Any]
    env: dict[str, str]


def residual_mount(spec: ResidualVolumeSpec | None, owner: Owner) -> ResidualMount:
    """The residual volume of a client pod: the named claim, else an emptyDir (with its sizeLimit).

    FEDERATOR_RESIDUAL_DIR is a folder per owner uid on it, so a Federation (or FederatedClient) deleted and
    created again, whose run may start over, never picks up the residuals of the one before; claims may be
    shared between Federations. Residual files are written atomically (runtime/residuals.py)."""
    volume: dict[str, Any]
    if spec is not None and spec.persistentVolumeClaim is not None:
        volume = {"name": RESIDUAL_VOLUME, "persistentVolumeClaim": {"claimName": spec.persistentVolumeClaim}}
    else:
        empty = {"sizeLimit": spec.sizeLimit} if spec is not None and spec.sizeLimit is not None else {}
        volume = {"name": RESIDUAL_VOLUME, "emptyDir": empty}
    return ResidualMount(volume, {"name": RESIDUAL_VOLUME, "mountPath": RESIDUAL_DIR},
                         {"FEDERATOR_RESIDUAL_DIR": posixpath.join(RESIDUAL_DIR, owner.uid)})


def _with_residuals(container: dict[str, Any], volumes: list[dict[str, Any]], fed: Federation,
                    spec: ResidualVolumeSpec | None, owner: Owner) -> None:
    """Add the residual volume to a client pod when the uplink has error feedback (else nothing to keep)."""
    if not fed.spec.compression.uplink.errorFeedback:
        return
    rm = residual_mount(spec, owner)
    volumes.append(rm.volume)
    container["volumeMounts"].append(rm.mount)
    env = {e["name"]: e["value"] for e in container["env"]}
    container["env"] = [{"name": k, "value": v} for k, v in sorted({**rm.env, **env}.items())]


def clients_deployment(fed: Federation, owner: Owner, *, finished: bool = False) -> dict[str, Any]:
    """The worker pool that trains the simulated clients; with autoscaling the HPA owns `replicas`.

    Once the federation has `finished` (Succeeded or Failed) the pool is scaled to zero: a worker exits
    when the server says STOP, and a Deployment would only restart it into a crash loop.
    """
    name, ns = fed.metadata.name, fed.metadata.namespace
    clients = fed.spec.clients
    container = _container(
        "client", clients.template, _client_args(fed, f"{SECRET_DIR}/{secrets.WORKER_TOKEN}"),
        mounts=[
            {"name": "federator", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        ports=_client_ports(),
    )
    volumes = [_config_volume(name, [secrets.WORKER_TOKEN, secrets.CA_CERT]), {"name": "tmp", "emptyDir": {}}]
    _with_residuals(container, volumes, fed, fed.spec.compression.uplink.residuals, owner)
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(name, "clients")},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
        "template": {
            "metadata": {
                "labels": labels(name, "clients"),
                "annotations": {CONFIG_HASH_ANNOTATION: config_hash(fed)},
            },
            "spec": _pod_spec([container], volumes),
        },
    }
    if finished:
        spec = {"replicas": 0, **spec}
    elif not clients.autoscaling.enabled:
        spec = {"replicas": clients.workers, **spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(clients_name(name), ns, owner, labels(name, "clients")),
        "spec": spec,
    }


def quantity(value: float) -> str:
    """A Kubernetes quantity for a metric target: 2.0 -> "2", 0.5 -> "500m"."""
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"


def clients_hpa(fed: Federation, owner: Owner) -> dict[str, Any]:
    """autoscaling/v2 on the server's pending-task gauge, read through the custom metrics API.

    prometheus-adapter exposes a gauge the server exports as an Object metric of the server's Service;
    `AverageValue` divides it by the current worker count, so the HPA aims at N pending tasks per worker.
    """
    name, ns = fed.metadata.name, fed.metadata.namespace
    auto = fed.spec.clients.autoscaling
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(clients_name(name), ns, owner, labels(name, "clients")),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": clients_name(name)},
            "minReplicas": auto.minReplicas,
            "maxReplicas": auto.maxReplicas,
            "metrics": [
                {
                    "type": "Object",
                    "object": {
                        "describedObject": {"apiVersion": "v1", "kind": "Service", "name": server_name(name)},
                        "metric": {"name": auto.metric},
                        "target": {"type": "AverageValue", "averageValue": quantity(auto.targetAverageValue)},
                    },
                }
            ],
        },
    }


def clients_pdb(fed: Federation, owner: Owner) -> dict[str, Any]:
    """Node drains take the worker pool down one pod at a time; rounds go on meanwhile.

    (The server gets none: a one-replica budget would block every drain until the run ends, and the
    server resumes from its checkpoint instead.)
    """
    name, ns = fed.metadata.name, fed.metadata.namespace
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(clients_name(name), ns, owner, labels(name, "clients")),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name, "clients")}},
    }


def server_network_policy(fed: Federation, owner: Owner) -> dict[str, Any]:
    """Only this federation's client pods reach gRPC; only Prometheus and the operator reach metrics."""
    name, ns = fed.metadata.name, fed.metadata.namespace
    server = fed.spec.server
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(server_name(name), ns, owner, labels(name, "server")),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name, "server")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {
                        "matchLabels": {FEDERATION_LABEL: name},
                        "matchExpressions": [{
                            "key": "app.kubernetes.io/component", "operator": "In", "values": ["clients", "silo"],
                        }],
                    }}],
                    "ports": [{"protocol": "TCP", "port": server.port}],
                },
                {
                    "from": [{
                        "namespaceSelector": {},
                        "podSelector": {"matchExpressions": [{
                            "key": "app.kubernetes.io/name", "operator": "In", "values": METRICS_READERS,
                        }]},
                    }],
                    "ports": [{"protocol": "TCP", "port": server.metricsPort}],
                },
            ],
        },
    }


SERVICE_MONITOR_API = "monitoring.coreos.com/v1"


def service_monitor(fed: Federation, owner: Owner) -> dict[str, Any]:
    name, ns = fed.metadata.name, fed.metadata.namespace
    return {
        "apiVersion": SERVICE_MONITOR_API,
        "kind": "ServiceMonitor",
        "metadata": _meta(server_name(name), ns, owner, labels(name, "server")),
        "spec": {
            "selector": {"matchLabels": selector_labels(name, "server")},
            "endpoints": [
                {"port": "metrics", "path": "/metrics", "interval": fed.spec.monitoring.scrapeInterval}
            ],
        },
    }


# --------------------------------------------------------------------------------------- silo clients


def silo_deployment(client: FederatedClient, owner: Owner, fed: Federation) -> dict[str, Any]:
    """A FederatedClient's pods: one identity (its own token), its own data volume mounted read-only."""
    cname, ns = client.metadata.name, client.metadata.namespace
    fname = fed.metadata.name
    data = client.spec.data
    token_key = secrets.silo_token_key(cname)
    args = [
        *_client_args(fed, f"{SECRET_DIR}/{token_key}"),
        "--silo", cname,
        "--data", posixpath.join(DATA_DIR, data.path.lstrip("/")),
        "--format", data.format,
    ]
    container = _container(
        "client", client.spec.template, args,
        mounts=[
            {"name": "federator", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "data", "mountPath": DATA_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        ports=_client_ports(),
    )
    volume = data.volume
    data_volume: dict[str, Any]
    if volume.persistentVolumeClaim is not None:
        data_volume = {"name": "data", "persistentVolumeClaim": {
            "claimName": volume.persistentVolumeClaim, "readOnly": True}}
    else:
        data_volume = {"name": "data", "hostPath": {"path": str(volume.hostPath), "type": "Directory"}}
    volumes = [_config_volume(fname, [token_key, secrets.CA_CERT]), data_volume, {"name": "tmp", "emptyDir": {}}]
    _with_residuals(container, volumes, fed, client.spec.residuals, owner)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(silo_name(cname), ns, owner, labels(fname, "silo", cname)),
        "spec": {
            "replicas": client.spec.replicas,
            "selector": {"matchLabels": selector_labels(fname, "silo", cname)},
            "template": {
                "metadata": {
                    "labels": labels(fname, "silo", cname),
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash(fed)},
                },
                "spec": _pod_spec([container], volumes),
            },
        },
    }


def silo_selector(client: FederatedClient, federation: str) -> str:
    return selector_string(selector_labels(federation, "silo", client.metadata.name))


# ------------------------------------------------------------------------------------------ together


def federation_children(fed: Federation, uid: str, *, service_monitor_api: bool, finished: bool = False) -> Desired:
    """Every child of a Federation but its Secret, in the order they are applied (config before pods).

    `finished`: the federation Succeeded or Failed: the worker pool goes to zero and its HPA away (an
    HPA cannot hold zero replicas); the server stays up to serve the result.

    The Secret is not here: its content is generated once and merged with what exists, under an
    optimistic lock (see `reconcile.ensure_credentials`), never blindly re-applied.
    """
    owner = federation_owner(fed, uid)
    name, ns = fed.metadata.name, fed.metadata.namespace
    spec = fed.spec
    apply = [config_map(fed, owner), server_service(fed, owner)]
    prune: list[ChildRef] = []
    if spec.server.checkpoint.enabled:
        apply.append(server_statefulset(fed, owner))
        prune.append(ChildRef("apps/v1", "Deployment", ns, server_name(name)))
    else:
        apply.append(server_deployment(fed, owner))
        prune.append(ChildRef("apps/v1", "StatefulSet", ns, server_name(name)))
    apply += [clients_deployment(fed, owner, finished=finished), clients_pdb(fed, owner),
              server_network_policy(fed, owner)]
    if spec.clients.autoscaling.enabled and not finished:
        apply.append(clients_hpa(fed, owner))
    else:
        prune.append(ChildRef("autoscaling/v2", "HorizontalPodAutoscaler", ns, clients_name(name)))
    if service_monitor_api:
        if spec.monitoring.serviceMonitor:
            apply.append(service_monitor(fed, owner))
        else:
            prune.append(ChildRef(SERVICE_MONITOR_API, "ServiceMonitor", ns, server_name(name)))
    return Desired(apply=apply, prune=prune)
