"""The CRDs: generated from the models, checked in without drift, structural, valid for every claimed
Kubernetes version, and their CEL rules agree with the models' validators on good and bad manifests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from federator.api import crd as crd_module
from federator.api.cel import rules_of, undeclared
from federator.api.crd import all_crds, federated_client_crd, federation_crd, file_name, render
from federator.api.models import FederatedClient, Federation
from federator.api.names import MAX_NAME_LENGTH
from federator.cli import main
from tests.helpers.kubeschema import K8S_VERSIONS, crd_schema, crd_violations, validate_upstream

ROOT = Path(__file__).resolve().parents[2]

FED: dict[str, Any] = {
    "apiVersion": "federator.dev/v1alpha1",
    "kind": "Federation",
    "metadata": {"name": "demo", "namespace": "default"},
    "spec": {"rounds": 5, "clients": {"count": 10, "perRound": 8, "minPerRound": 6}},
}
FEDC: dict[str, Any] = {
    "apiVersion": "federator.dev/v1alpha1",
    "kind": "FederatedClient",
    "metadata": {"name": "hospital-a", "namespace": "default"},
    "spec": {"federationRef": {"name": "demo"}, "data": {"volume": {"persistentVolumeClaim": "data-a"}}},
}


def with_spec(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node = out
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


# ------------------------------------------------------------------------------------------- drift


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_checked_in_crds_match_the_models(crd: dict[str, Any]) -> None:
    checked_in = (ROOT / "crds" / file_name(crd)).read_text()
    assert checked_in == render(crd), "crds/ drifted from federator/api/models.py: run `make crds`"


def test_cli_writes_and_prints_the_crds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds", "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["federatedclients.federator.dev.yaml", "federations.federator.dev.yaml"]
    for path in tmp_path.iterdir():
        assert path.read_text() == (ROOT / "crds" / path.name).read_text()
    capsys.readouterr()
    assert main(["crds"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["metadata"]["name"] for d in docs] == ["federations.federator.dev", "federatedclients.federator.dev"]


# ------------------------------------------------------------------------------------------ schema


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_crds_are_valid_customresourcedefinitions(crd: dict[str, Any], version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(yaml.safe_load(render(crd)), version, strict=True)


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for prop, sub in (node.get("properties") or {}).items():
        out += _walk(sub, f"{path}.{prop}")
    if isinstance(node.get("items"), dict):
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}.*")
    return out


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_schemas_are_structural(crd: dict[str, Any]) -> None:
    for path, node in _walk(crd_schema(crd)):
        for key in ("$ref", "anyOf", "oneOf", "allOf", "const", "title", "$defs"):
            assert key not in node, f"{path}: {key} is not allowed in a structural schema"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound) in (None, True), f"{path}: OpenAPI 3.0 wants a boolean {bound}"
        if node.get("nullable"):
            assert "default" not in node, f"{path}: a nullable field has no default"
        if "default" in node and node.get("type") == "object" and "properties" in node:
            assert node["default"] == {}, f"{path}: nested defaults come from the nested fields"


def test_schema_details() -> None:
    spec = crd_schema(federation_crd())["properties"]["spec"]
    assert spec["required"] == ["rounds"]
    clients = spec["properties"]["clients"]["properties"]
    assert clients["perRound"] == {
        "description": "Clients sampled each round (default: count).",
        "type": "integer", "nullable": True, "minimum": 1, "maximum": 100000,
    }
    args = spec["properties"]["model"]["properties"]["args"]
    assert args["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["properties"]["data"]["properties"]["dataset"]["enum"] == [
        "digits", "synthetic", "npz", "csv", "imagefolder"]
    assert spec["properties"]["rounds"]["description"] == "Number of federated rounds."
    lr = spec["properties"]["training"]["properties"]["learningRate"]
    assert lr["minimum"] == 0.0 and lr["exclusiveMinimum"] is True and lr["default"] == 0.05
    status = crd_schema(federation_crd())["properties"]["status"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert all("default" not in node for _, node in _walk(status))


def test_names_subresources_and_columns() -> None:
    fed, fedc = federation_crd(), federated_client_crd()
    assert fed["spec"]["names"]["shortNames"] == ["fed"]
    assert fedc["spec"]["names"]["shortNames"] == ["fedc"]
    assert fed["spec"]["names"]["categories"] == fedc["spec"]["names"]["categories"] == ["federator"]
    assert fed["spec"]["versions"][0]["subresources"] == {"status": {}}
    scale = fedc["spec"]["versions"][0]["subresources"]["scale"]
    assert scale == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                     "labelSelectorPath": ".status.selector"}
    # an HPA can only use /scale when the status schema declares both fields
    status = crd_schema(fedc)["properties"]["status"]["properties"]
    assert status["replicas"]["type"] == "integer" and status["selector"]["type"] == "string"
    columns = {c["name"]: c["jsonPath"] for c in fed["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase", "Round": ".status.round", "Rounds": ".spec.rounds",
        "Accuracy": ".status.accuracy", "Epsilon": ".status.epsilon", "Clients": ".status.clients.ready",
        "Age": ".metadata.creationTimestamp",
    }


def test_optional_unions_other_than_null_are_refused() -> None:
    with pytest.raises(crd_module.SchemaError):
        crd_module.structural({"anyOf": [{"type": "integer"}, {"type": "string"}]}, {})


# --------------------------------------------------------------------------------------------- CEL


def test_good_manifests_pass_the_cel_rules() -> None:
    assert crd_violations(federation_crd(), FED) == []
    assert crd_violations(federated_client_crd(), FEDC) == []
    minimal = with_spec(FED, "spec", {"rounds": 1})  # every default, perRound and minPerRound absent
    assert crd_violations(federation_crd(), minimal) == []


BAD_FEDERATIONS = [
    ("spec.clients.perRound", 11, ".spec.clients.perRound", "perRound must be <= count"),
    ("spec.clients.minPerRound", 9, ".spec.clients.minPerRound", "minPerRound must be <= perRound"),
    ("spec.clients.autoscaling", {"enabled": True, "minReplicas": 5, "maxReplicas": 2},
     ".spec.clients.autoscaling.minReplicas", "minReplicas must be <= maxReplicas"),
    ("spec.server", {"port": 8080}, ".spec.server.metricsPort", "port and metricsPort must differ"),
    ("spec.data", {"dataset": "npz"}, ".spec.data.path", "path is required when dataset is npz"),
    ("metadata.name", "x" * 46, "", "metadata.name must be at most 45 characters"),
    ("spec.byzantine", {"reputation": {"k": 4, "window": 3}, "detection": {}}, ".spec.byzantine.reputation.k",
     "k must be <= window"),
    ("spec.byzantine", {"reputation": {}}, ".spec.byzantine.reputation", "reputation counts detection flags"),
    ("spec.byzantine", {"attack": {"type": "sign_flip"}}, ".spec.byzantine.attack",
     "set exactly one of count or fraction"),
    ("spec.byzantine", {"expectedFraction": 0.3}, ".spec.byzantine.expectedFraction",
     "aggregation.rule fedavg tolerates no Byzantine client"),
    ("spec.compression", {"uplink": {"errorFeedback": True, "bits": 32}}, ".spec.compression.uplink.errorFeedback",
     "errorFeedback needs a lossy uplink"),
    ("spec.compression", {"uplink": {"topK": 0.01, "residuals": {"persistentVolumeClaim": "rwx"}}},
     ".spec.compression.uplink.residuals", "residuals is where error feedback keeps what it left out"),
    ("spec.compression", {"uplink": {"topK": 0.01, "errorFeedback": True,
                                     "residuals": {"persistentVolumeClaim": "rwx", "sizeLimit": "1Gi"}}},
     ".spec.compression.uplink.residuals.sizeLimit", "sizeLimit is the emptyDir's"),
    ("spec.aggregation", {"rule": "median", "nnm": {}, "bucketing": {"size": 2}}, ".spec.aggregation.nnm",
     "nnm and bucketing are two remedies for the same problem"),
]


@pytest.mark.parametrize(("field", "value", "where", "message"), BAD_FEDERATIONS, ids=[b[0] for b in BAD_FEDERATIONS])
def test_cel_rejects_bad_federations_like_the_models_do(field: str, value: Any, where: str, message: str) -> None:
    bad = with_spec(FED, field, value)
    violations = crd_violations(federation_crd(), bad)
    assert len(violations) == 1, violations
    assert violations[0][0] == where
    assert violations[0][1].startswith(message)
    with pytest.raises(ValidationError):
        Federation.model_validate(bad)


def test_the_longest_name_passes_both_the_model_and_cel() -> None:
    longest = with_spec(FED, "metadata.name", "x" * MAX_NAME_LENGTH)
    assert crd_violations(federation_crd(), longest) == []
    Federation.model_validate(longest)
    client = with_spec(with_spec(FEDC, "metadata.name", "c" * MAX_NAME_LENGTH), "spec.federationRef.name",
                       "x" * MAX_NAME_LENGTH)
    assert crd_violations(federated_client_crd(), client) == []
    FederatedClient.model_validate(client)
    too_long = with_spec(FEDC, "metadata.name", "c" * (MAX_NAME_LENGTH + 1))
    assert [v[1] for v in crd_violations(federated_client_crd(), too_long)] == [
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters (children append suffixes)"]
    with pytest.raises(ValidationError, match="at most 45 characters"):
        FederatedClient.model_validate(too_long)


def test_min_per_round_defaults_to_count_when_per_round_is_absent() -> None:
    bad = with_spec(FED, "spec.clients", {"count": 4, "minPerRound": 5})
    assert [v[1] for v in crd_violations(federation_crd(), bad)] == [
        "minPerRound must be <= perRound (perRound defaults to count)"]
    with pytest.raises(ValidationError):
        Federation.model_validate(bad)


def test_a_silo_residual_volume_is_checked_by_cel_like_the_model() -> None:
    good = with_spec(FEDC, "spec.residuals", {"persistentVolumeClaim": "silo-a.residuals"})
    assert crd_violations(federated_client_crd(), good) == []
    FederatedClient.model_validate(good)
    bad = with_spec(FEDC, "spec.residuals", {"persistentVolumeClaim": "silo-a", "sizeLimit": "2Gi"})
    assert [v[0] for v in crd_violations(federated_client_crd(), bad)] == [".spec.residuals.sizeLimit"]
    with pytest.raises(ValidationError, match="sizeLimit is the emptyDir's"):
        FederatedClient.model_validate(bad)
    with pytest.raises(ValidationError, match="persistentVolumeClaim"):
        FederatedClient.model_validate(with_spec(FEDC, "spec.residuals", {"persistentVolumeClaim": "Not_A_Name"}))


@pytest.mark.parametrize("volume", [{}, {"persistentVolumeClaim": "a", "hostPath": "/data"}])
def test_cel_wants_exactly_one_silo_volume(volume: dict[str, str]) -> None:
    bad = with_spec(FEDC, "spec.data.volume", volume)
    assert [v[1] for v in crd_violations(federated_client_crd(), bad)] == [
        "set exactly one of persistentVolumeClaim or hostPath"]
    with pytest.raises(ValidationError):
        FederatedClient.model_validate(bad)


def all_models() -> set[type[BaseModel]]:
    from federator.api import models

    declared = {cls for cls in vars(models).values()
                if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == models.__name__}
    return declared | set(crd_module.nested_models(Federation)) | set(crd_module.nested_models(FederatedClient))


def test_every_model_validator_declares_its_cel_twin() -> None:
    """A cross-field validator comes with `@cel(...)` (or `@cel_none(why)`): the CRD cannot forget a rule."""
    missing = {cls.__name__: names for cls in all_models() if (names := undeclared(cls))}
    assert missing == {}, f"add @cel(rule, message) under @model_validator: {missing}"


def test_every_cel_rule_is_generated_into_the_crd_and_has_a_bad_example() -> None:
    """Each declared rule lands in the CRD, and the tables above run it through both CEL and pydantic."""
    declared = [r for cls in all_models() for r in rules_of(cls)]
    assert len(declared) == 14  # perRound, minPerRound, minReplicas, ports, path, silo volume; byzantine: 4;
    # compression: errorFeedback, residuals need errorFeedback, emptyDir-only sizeLimit; aggregation: nnm or bucketing
    generated = [v for _, node in _walk(crd_schema(federation_crd())) + _walk(crd_schema(federated_client_crd()))
                 for v in node.get("x-kubernetes-validations", [])]
    examples = [m for *_, m in BAD_FEDERATIONS] + ["minPerRound must be <= perRound (perRound defaults to count)",
                                                  "set exactly one of persistentVolumeClaim or hostPath"]
    for rule in declared:
        assert rule.validation() in generated, rule
        assert any(rule.message.startswith(m) for m in examples), f"no bad example for {rule.message!r}"


def test_a_rule_declared_with_cel_reaches_the_schema_of_its_model() -> None:
    """The mechanism itself, on a model made here: what another engineer's new validator gets."""
    from pydantic import model_validator

    from federator.api.cel import cel, cel_none

    class Tolerance(BaseModel):
        fraction: float = 0.0
        limit: float = 0.5

        @model_validator(mode="after")
        @cel("self.fraction < self.limit", "fraction must be < limit", field_path=".fraction")
        def _below(self) -> Tolerance:
            if self.fraction >= self.limit:
                raise ValueError("fraction must be < limit")
            return self

    class Outer(BaseModel):
        tolerance: Tolerance = Tolerance()

        @model_validator(mode="after")
        @cel_none("reads a file")
        def _file(self) -> Outer:
            return self

    schema = crd_module._schema_of(Outer, defaults=True)
    assert schema["properties"]["tolerance"]["x-kubernetes-validations"] == [
        {"rule": "self.fraction < self.limit", "message": "fraction must be < limit", "fieldPath": ".fraction"}]
    assert undeclared(Outer) == [] and undeclared(Tolerance) == []
    wrapped = {"type": "object", "properties": {"spec": schema}}
    from tests.helpers.kubeschema import cel_violations

    bad = {"spec": {"tolerance": {"fraction": 0.6, "limit": 0.5}}}
    assert cel_violations(wrapped, bad) == [(".spec.tolerance.fraction", "fraction must be < limit")]
    with pytest.raises(ValidationError, match="fraction must be < limit"):
        Outer.model_validate(bad["spec"])
    assert cel_violations(wrapped, {"spec": {"tolerance": {"fraction": 0.1, "limit": 0.5}}}) == []


def test_upstream_helper_rejects_an_invalid_object() -> None:
    import kubernetes_validate

    with pytest.raises(kubernetes_validate.ValidationError):
        validate_upstream({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "date": {}})
