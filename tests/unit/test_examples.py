"""Every manifest in examples/ is valid: for the models, for the CRDs' CEL rules, for the operator's own
checks, and every child the operator would create from it is valid Kubernetes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from federator.api.crd import federated_client_crd, federation_crd
from federator.api.manifest import load_documents
from federator.api.models import FederatedClient, Federation
from federator.operator import children, reconcile
from tests.helpers.kubeschema import crd_violations, restricted_problems, validate_upstream

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
DOCS = [(path, i, doc) for path in EXAMPLES for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "silo-clients.yaml", "autoscaling.yaml", "noniid.yaml", "compression.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    docs = load_documents(path)
    assert docs
    assert all(d.kind in ("Federation", "FederatedClient") for d in docs)


@pytest.mark.parametrize(("path", "index", "doc"), DOCS, ids=[f"{p.name}#{i}" for p, i, _ in DOCS])
def test_example_passes_the_crd_rules_and_the_operator(path: Path, index: int, doc: dict[str, Any]) -> None:
    assert "status" not in doc
    body = {**doc, "metadata": {"namespace": "default", **doc["metadata"]}}
    if doc["kind"] == "Federation":
        assert crd_violations(federation_crd(), doc) == []
        fed = reconcile.parse_federation(body)  # the operator's own checks (InvalidSpec otherwise)
        desired = children.federation_children(fed, "uid-1", service_monitor_api=False)
        for manifest in desired.apply:
            validate_upstream(manifest)
            if manifest["kind"] in ("Deployment", "StatefulSet"):
                assert restricted_problems(manifest["spec"]["template"]["spec"]) == []
    else:
        assert crd_violations(federated_client_crd(), doc) == []
        client = reconcile.parse_client(body)
        fed = _federation_of(path, client)
        silo = children.silo_deployment(client, children.client_owner(client, "uid-2"), fed)
        validate_upstream(silo)


def _federation_of(path: Path, client: FederatedClient) -> Federation:
    for doc in load_documents(path):
        if isinstance(doc.obj, Federation) and doc.name == client.spec.federationRef.name:
            return doc.obj
    raise AssertionError(f"{path.name}: no Federation {client.spec.federationRef.name!r} beside the client")
