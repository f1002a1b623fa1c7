"""`federator validate`: exit 0 on good manifests; exit 2 and one line per problem naming field, value, fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from federator.api.models import Federation
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


def test_a_non_utf8_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.yaml"
    text = yaml.safe_dump(manifest())
    path.write_bytes(text.encode() + "# caf\xe9\n".encode("latin-1"))
    code, lines = validate(capsys, path)
    assert code == 2
    line = text.count("\n") + 1
    assert lines == [f"{path}: (file): not UTF-8 text (byte 0xe9 on line {line}); save the file as UTF-8"]


def test_a_key_given_twice_is_refused_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "twice.yaml"
    text = yaml.safe_dump(manifest(), sort_keys=False)
    path.write_text(text.replace("  rounds: 3\n", "  rounds: 3\n  rounds: 4\n"))
    code, lines = validate(capsys, path)
    assert code == 2 and len(lines) == 1
    assert "key 'rounds' appears twice (lines 6 and 7): keep one" in lines[0]


@pytest.mark.parametrize(("section", "value", "field"), [
    ("rounds", "3", "spec.rounds"),
    ("training", {"learningRate": "0.1"}, "spec.training.learningRate"),
    ("clients", {"count": 4.0}, "spec.clients.count"),
    ("data", {"partition": {"scheme": "iid"}, "seed": True}, "spec.data.seed"),
])
def test_types_are_strict_as_in_the_crd(tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str,
                                        value: object, field: str) -> None:
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", manifest(**{section: value})))
    assert code == 2 and len(lines) == 1 and f": {field}: " in lines[0], lines


def test_an_integer_is_a_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = validate(capsys, write_manifest(tmp_path / "m.yaml", manifest(training={"learningRate": 1})))
    assert code == 0  # as in OpenAPI, where an integer is a number


def test_an_unknown_model_lists_the_names_in_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", manifest(model={"name": "resnet"})))
    assert code == 2 and len(lines) == 1
    assert "spec.model.name" in lines[0] and "'resnet'" in lines[0]
    assert "allowed: a built-in model (mlp, cnn, lenet5) or module:factory of your own" in lines[0]
    assert "^(" not in lines[0]


def test_a_data_file_that_does_not_exist_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = manifest(data={"dataset": "npz", "path": str(tmp_path / "absent.npz")})
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2 and len(lines) == 1
    assert f"data.path: {tmp_path / 'absent.npz'} does not exist; set data.path to an existing file" in lines[0]
    assert "pod" not in lines[0]


def test_a_data_file_that_does_not_open_in_its_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    doc = manifest(data={"dataset": "npz", "path": str(tmp_path / "junk.npz")})
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2 and len(lines) == 1 and f"data.path: {tmp_path / 'junk.npz'} is not an npz file" in lines[0]
    assert "pickle" not in lines[0]


@pytest.mark.parametrize(("name", "says"), [
    ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
    ("tests.helpers.factories:nothing_here", "has no callable 'nothing_here'"),
    ("tests.helpers.factories:wrong_signature", "calling wrong_signature(input_shape=..., num_classes=..., "),
    ("tests.helpers.factories:not_a_module", "the factory returned dict, not a torch.nn.Module"),
    ("tests.helpers.factories:raises", "the factory raised RuntimeError: CUDA is not available"),
])
def test_a_custom_model_must_import_and_build_a_module(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       name: str, says: str) -> None:
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", manifest(model={"name": name})))
    assert code == 2 and len(lines) == 1 and says in lines[0], lines


def test_a_custom_model_that_builds_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = manifest(model={"name": "tests.helpers.bigmodel:ballast", "args": {"megabytes": 1}})
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 0, lines


def test_run_checks_the_data_before_starting_anything(tmp_path: Path) -> None:
    doc = manifest(data={"dataset": "csv", "path": "nowhere.csv"})
    path = write_manifest(tmp_path / "m.yaml", doc)
    done = subprocess.run([sys.executable, "-m", "federator", "run", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert f"data.path: nowhere.csv does not exist (relative to {tmp_path})" in done.stderr
    assert not (tmp_path / "out").exists()


# aggregation.maxBufferBytes: BASE's mlp [32] on digits (64 inputs, 10 classes) has 64*32+32 + 32*10+10 = 2410
# parameters; a buffered round of perRound=4 updates holds 4 x 2410 x 4 = 38560 bytes.
DIGITS_MLP_PARAMETERS = 2410
DIGITS_MLP_ROUND_BYTES = 38_560


@pytest.mark.parametrize("extra", [
    {"aggregation": {"rule": "median"}},
    {"aggregation": {"rule": "fedavg"}, "byzantine": {"detection": {"method": "norm"}}},
])
def test_a_buffered_round_over_max_buffer_bytes_fails_with_both_numbers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: dict[str, dict[str, object]]) -> None:
    doc = manifest(**extra)
    doc["spec"]["aggregation"]["maxBufferBytes"] = DIGITS_MLP_ROUND_BYTES - 1
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2 and len(lines) == 1, lines
    assert f"aggregation.maxBufferBytes={DIGITS_MLP_ROUND_BYTES - 1} is too small" in lines[0]
    assert f"= {DIGITS_MLP_ROUND_BYTES} bytes per round" in lines[0]
    assert "lower clients.perRound" in lines[0] and "use rule fedavg" in lines[0]
    # the server refuses the same spec with the same words (its pipeline, on the model it builds)
    from federator.runtime.aggregation import AggregationPipeline
    from federator.runtime.models import build_model
    from federator.runtime.training import get_params

    spec = Federation.model_validate(doc).spec
    params = get_params(build_model(spec.model, (1, 8, 8), 10, seed=0))
    with pytest.raises(ValueError) as refused:
        AggregationPipeline(spec, params)
    assert lines[0].endswith(f"Federation/test: {refused.value}")


def test_a_buffered_round_that_just_fits_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = manifest(aggregation={"rule": "median", "maxBufferBytes": DIGITS_MLP_ROUND_BYTES})
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 0, lines


def test_fedavg_streams_so_its_buffer_is_never_checked_and_torch_never_imported(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.yaml", manifest(aggregation={"rule": "fedavg", "maxBufferBytes": 1}))
    probe = ("import sys\nfrom federator.cli import main\n"
             f"code = main(['validate', {str(path)!r}])\nprint(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 False", done.stdout


def test_the_buffer_is_counted_for_file_data_and_custom_models(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(30, 5)).astype(np.float32), y=np.arange(30) % 3)
    # mlp [4] on 5 features and 3 classes: 5*4+4 + 4*3+3 = 39 parameters; 4 updates: 624 bytes
    doc = manifest(data={"dataset": "npz", "path": str(tmp_path / "d.npz")}, model={"name": "mlp", "hiddenSizes": [4]},
                   aggregation={"rule": "trimmed_mean", "trimFraction": 0.0, "maxBufferBytes": 623})
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2 and len(lines) == 1 and "= 624 bytes per round" in lines[0], lines
    doc["spec"]["aggregation"]["maxBufferBytes"] = 624
    assert validate(capsys, write_manifest(tmp_path / "m.yaml", doc))[0] == 0
    # ballast of 1/64 MiB (4096 floats) + a 64 -> 10 head (650): 4746 parameters; 4 updates: 75936 bytes
    doc = manifest(model={"name": "tests.helpers.bigmodel:ballast", "args": {"megabytes": 1 / 64}},
                   aggregation={"rule": "krum", "maxBufferBytes": 75_935})
    code, lines = validate(capsys, write_manifest(tmp_path / "m.yaml", doc))
    assert code == 2 and len(lines) == 1 and "= 75936 bytes per round" in lines[0], lines


def test_run_checks_the_round_buffer_before_starting_anything(tmp_path: Path) -> None:
    doc = manifest(aggregation={"rule": "geometric_median", "maxBufferBytes": 1000})
    path = write_manifest(tmp_path / "m.yaml", doc)
    done = subprocess.run([sys.executable, "-m", "federator", "run", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "aggregation.maxBufferBytes=1000 is too small" in done.stderr
    assert f"= {DIGITS_MLP_ROUND_BYTES} bytes per round" in done.stderr
    assert not (tmp_path / "out").exists()
