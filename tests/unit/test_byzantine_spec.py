"""The aggregation and byzantine sections of the API: the tolerance check (model, CEL, `federator validate`),
its messages, and that its numbers are the kernels' own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from federator.api.crd import federation_crd
from federator.api.models import FederationSpec
from federator.api.tolerance import ROBUST_RULES, rule_tolerance
from federator.runtime import robust
from tests.helpers.kubeschema import crd_violations
from tests.helpers.manifests import manifest

ROOT = Path(__file__).resolve().parents[2]


def _spec(rule: str, fraction: float, n: int = 10, **agg: Any) -> dict[str, Any]:
    return {"rounds": 1, "clients": {"count": n, "minPerRound": n},
            "aggregation": {"rule": rule, **agg}, "byzantine": {"expectedFraction": fraction}}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10, 11, 20, 50, 101])
def test_the_api_tolerance_is_the_kernels_max_byzantine(n: int) -> None:
    for rule in ("fedavg", *ROBUST_RULES):
        for s in (1, 2, 3):
            assert rule_tolerance(rule, n, bucket_size=s, trim_fraction=0.3) == robust.max_byzantine(
                rule, n, bucket_size=s, trim_fraction=0.3), (rule, n, s)
    for f in (0, 1, 3, 10):
        assert rule_tolerance("krum", n, f=f) == robust.max_byzantine("krum", n, f=f), (n, f)


def test_a_spec_beyond_the_rule_names_the_limit_and_rules_that_work() -> None:
    with pytest.raises(ValidationError) as err:
        FederationSpec.model_validate(_spec("fedavg", 0.3))
    msg = str(err.value)
    assert ("byzantine.expectedFraction=0.3 of clients.minPerRound=10 is 3 Byzantine updates, but "
            "aggregation.rule=fedavg tolerates at most 0 of 10") in msg
    assert "median (tolerates 4)" in msg and "trimmed_mean with trimFraction >= 0.3" in msg


@pytest.mark.parametrize(("agg", "limit", "hint"), [
    ({"rule": "trimmed_mean", "trimFraction": 0.2}, "tolerates at most 2 of 10", "trimFraction >= 0.3"),
    ({"rule": "krum", "f": 1}, "tolerates at most 1 of 10", "aggregation.f >= 3"),
    ({"rule": "median", "bucketing": {"size": 3}}, "tolerates at most 1 of 10", "smaller aggregation.bucketing.size"),
])
def test_each_rule_limit_has_its_own_fix(agg: dict[str, Any], limit: str, hint: str) -> None:
    with pytest.raises(ValidationError) as err:
        FederationSpec.model_validate(_spec(agg.pop("rule"), 0.3, **agg))
    assert limit in str(err.value) and hint in str(err.value)


def test_specs_within_tolerance_pass() -> None:
    for rule in ("median", "krum", "multi_krum", "geometric_median", "centered_clipping"):
        FederationSpec.model_validate(_spec(rule, 0.3))
    FederationSpec.model_validate(_spec("trimmed_mean", 0.3, trimFraction=0.3))
    FederationSpec.model_validate(_spec("fedavg", 0.0))
    with pytest.raises(ValidationError, match="tolerates at most 4 of 10"):
        FederationSpec.model_validate(_spec("median", 0.5))


@pytest.mark.parametrize(("byz", "message"), [
    ({"attack": {"type": "sign_flip"}}, "set exactly one of count or fraction"),
    ({"attack": {"type": "sign_flip", "count": 1, "parameters": {"std": 1}}}, "do not apply to attack 'sign_flip'"),
    ({"reputation": {"k": 4, "window": 3}, "detection": {}}, "k (4) must be <= window (3)"),
    ({"reputation": {}}, "reputation counts detection flags: set byzantine.detection too"),
    ({"detection": {"method": "entropy"}}, "byzantine.detection.method"),
])
def test_bad_byzantine_sections_name_the_field(byz: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        FederationSpec.model_validate({"rounds": 1, "aggregation": {"rule": "median"}, "byzantine": byz})
    text = str(err.value)
    assert message in text or message.replace("byzantine.detection.", "") in text.replace("\n", " "), text


def test_the_crd_rejects_fedavg_with_byzantine_clients_and_accepts_a_robust_rule() -> None:
    bad = manifest(byzantine={"expectedFraction": 0.3})
    [(where, msg)] = crd_violations(federation_crd(), bad)
    assert where == ".spec.byzantine.expectedFraction" and msg.startswith("aggregation.rule fedavg tolerates")
    good = manifest(aggregation={"rule": "median"}, byzantine={"expectedFraction": 0.3})
    assert crd_violations(federation_crd(), good) == []
    assert crd_violations(federation_crd(), manifest(byzantine={"attack": {"type": "ipm"}})) != []
    [(where, msg)] = crd_violations(federation_crd(), manifest(byzantine={"reputation": {}}))
    assert where == ".spec.byzantine.reputation" and msg.startswith("reputation counts detection flags")


def test_federator_validate_prints_the_tolerance_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest(clients={"minPerRound": 4}, byzantine={"expectedFraction": 0.3})))
    res = subprocess.run([sys.executable, "-m", "federator", "validate", str(path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert "expectedFraction=0.3 of clients.minPerRound=4 is 2 Byzantine updates" in res.stderr, res.stderr
    assert "aggregation.rule=fedavg tolerates at most 0 of 4" in res.stderr
