"""`federator validate`: exit 0 on good manifests; exit 2 and one line per problem naming field, value, fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from federator.cli import main
from tests.helpers.manifests import manifest, write_manifest

ROOT = Path(__file__).resolve().parents[2]


def validate(capsys: pytest.CaptureFixture[str], *files: Path) -> tuple[int, list[str]]:
    code = main(["validate", *map(str, files)])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line]


def test_good_manifest_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "examples" / "quickstart.yaml")]) == 0
    assert "Federation/quickstart is valid" in capsys.readouterr().out


def test_missing_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = manifest()
    del doc["spec"]["rounds"]
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2
    assert lines == [f"{tmp_path / 'm.yaml'}: spec.rounds: Field required (got missing); allowed: add the field"]


def test_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = manifest(training={"batchSize": "big"})
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2 and len(lines) == 1
    assert "spec.training.batchSize" in lines[0] and "'big'" in lines[0] and "valid integer" in lines[0]


def test_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = manifest(data={"partition": {"scheme": "dirichlet", "alpha": -1}}, rounds=0)
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2
    assert any("spec.rounds" in ln and "(got 0)" in ln and ">= 1" in ln for ln in lines), lines
    assert any("spec.data.partition.alpha" in ln and "(got -1)" in ln and "> 0" in ln for ln in lines), lines


def test_unknown_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = manifest(training={"learningRat": 0.1})
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2 and len(lines) == 1
    assert "spec.training.learningRat" in lines[0] and "remove the field" in lines[0]


def test_bad_enum_lists_the_allowed_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = manifest(data={"partition": {"scheme": "random"}})
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2
    assert "spec.data.partition.scheme" in lines[0] and "'iid', 'dirichlet' or 'shards'" in lines[0]


def test_cross_field_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = manifest(clients={"count": 4, "perRound": 3, "minPerRound": 4})
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2
    assert "spec.clients: minPerRound (4) must be <= perRound (3)" in lines[0]
    doc = manifest(data={"dataset": "csv"})
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2 and "path is required when dataset is 'csv'" in lines[0]


def test_every_problem_of_every_document_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_kind = {"apiVersion": "federator.dev/v1alpha1", "kind": "Federashun", "metadata": {"name": "x"}}
    bad_version = dict(manifest(), apiVersion="federator.dev/v1")
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump_all([manifest(), bad_kind, bad_version]))
    code, lines = validate(capsys, path)
    assert code == 2
    assert any(ln.endswith("document 1: kind: unknown kind (got 'Federashun'); allowed: Federation, FederatedClient")
               for ln in lines)
    assert any("document 2: apiVersion: must be 'federator.dev/v1alpha1'" in ln for ln in lines)


def test_not_yaml_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("spec: [unclosed\n")
    code, lines = validate(capsys, path, tmp_path / "absent.yaml")
    assert code == 2
    assert any("not valid YAML" in ln for ln in lines)
    assert any("absent.yaml: file not found" in ln for ln in lines)


def test_console_script_exit_code(tmp_path: Path) -> None:
    doc = manifest(clients={"count": 0})
    path = write_manifest(tmp_path / "m.yaml", doc)
    done = subprocess.run([sys.executable, "-m", "federator", "validate", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "spec.clients.count" in done.stderr and "(got 0)" in done.stderr


def test_run_refuses_an_invalid_manifest_without_starting_anything(tmp_path: Path) -> None:
    doc = manifest(model={"name": "resnet9000"})
    path = write_manifest(tmp_path / "m.yaml", doc)
    done = subprocess.run([sys.executable, "-m", "federator", "run", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "spec.model.name" in done.stderr and "'resnet9000'" in done.stderr
    assert not (tmp_path / "out").exists()
