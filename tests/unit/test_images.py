"""The two Dockerfiles, checked by reading them (no container engine runs here): multi-stage, pinned
base, non-root, no secrets, CPU PyTorch by default with a CUDA build argument, and the entrypoints that
the chart and the operator call exist and have their imports installed."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from federator.api.models import PodTemplate
from federator.cli import COMMANDS
from federator.operator import children
from tests.helpers.chart import one, render

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {"operator": ROOT / "operator" / "Dockerfile", "runtime": ROOT / "runtime" / "Dockerfile"}
SECRET_WORDS = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARGs (before the first FROM) and their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def resolve(self, text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.args.get(m.group(1), m.group(0)), text)


def parse(path: Path) -> Dockerfile:
    """Instructions with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            base, _, name = rest.partition(" AS ")
            stages.append(Stage(base=base.strip(), name=name.strip() or None))
        elif stages:
            stages[-1].instructions.append((op, rest))
        elif op == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
    return Dockerfile(args, stages)


def exec_form(value: str) -> list[str]:
    parsed: list[str] = json.loads(value)
    return parsed


@pytest.mark.parametrize("image", IMAGES)
def test_multi_stage_with_a_pinned_base(image: str) -> None:
    df = parse(IMAGES[image])
    assert len(df.stages) >= 2, "build in one stage, copy only the installed result into the final one"
    final = df.final
    assert any(op == "COPY" and rest.startswith(f"--from={df.stages[0].name}") for op, rest in final.instructions)
    assert not any(op == "RUN" and "pip install" in rest for op, rest in final.instructions), "builds in the final one"
    for stage in df.stages:
        base = df.resolve(stage.base)
        assert "$" not in base, f"{image}: FROM {stage.base} has no default"
        # a full version (x.y.z) and a named Debian release, or a digest; never `latest` or a moving tag
        assert re.fullmatch(r"[\w./-]+(:\d+\.\d+\.\d+-[a-z]+-[a-z]+|@sha256:[0-9a-f]{64})", base), base


@pytest.mark.parametrize("image", IMAGES)
def test_runs_as_the_non_root_user_the_pods_expect(image: str) -> None:
    final = parse(IMAGES[image]).final
    users = [rest for op, rest in final.instructions if op == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric uid, so that runAsNonRoot can verify it"
    # the pods' securityContext (the operator's children and the chart) run as this uid
    assert int(uid) == children.RUN_AS
    chart_pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert chart_pod["securityContext"]["runAsUser"] == int(uid)


@pytest.mark.parametrize("image", IMAGES)
def test_no_secrets_baked_in(image: str) -> None:
    df = parse(IMAGES[image])
    for stage in df.stages:
        for op, rest in stage.instructions:
            if op in ("ENV", "ARG"):
                assert not SECRET_WORDS.search(rest), f"{image}: {op} {rest}"
            if op in ("COPY", "ADD"):
                assert not re.search(r"\.(pem|key|crt)\b|kubeconfig|\.env\b", rest), f"{image}: {op} {rest}"
                assert op != "ADD", "COPY, never ADD (no remote URLs or auto-extraction)"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "**/*.pem", "**/*.key"} <= set(ignored)  # the build context leaves them out


def test_the_runtime_has_cpu_torch_by_default_and_a_cuda_build_argument() -> None:
    df = parse(IMAGES["runtime"])
    build = df.stages[0]
    stage_args = dict(rest.partition("=")[::2] for op, rest in build.instructions if op == "ARG")
    assert stage_args["TORCH_INDEX"].endswith("/whl/cpu")
    installs = [rest for op, rest in build.instructions if op == "RUN" and "pip install" in rest]
    assert installs and all("-c constraints.txt" in r and "${TORCH_INDEX}" in r for r in installs)
    assert "BASE" in df.args  # a CUDA base image is one --build-arg away
    text = IMAGES["runtime"].read_text()
    assert "--build-arg TORCH_INDEX=" in text and "--build-arg BASE=" in text  # both documented


def test_entrypoints_are_console_scripts_with_the_subcommands_callers_use() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    operator_entry = exec_form(dict(parse(IMAGES["operator"]).final.instructions)["ENTRYPOINT"])
    runtime_entry = exec_form(dict(parse(IMAGES["runtime"]).final.instructions)["ENTRYPOINT"])
    assert operator_entry[0] in scripts and runtime_entry[0] in scripts
    assert operator_entry[1] in COMMANDS
    # the chart overrides the operator's command; the operator's children run the runtime image
    chart_command = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert chart_command[0] in scripts and chart_command[1] == "operator"
    assert {"server", "client"} <= set(COMMANDS)


def _distribution(name: str) -> str:
    return re.split(r"[<>=!~\[; ]", name, maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: set[str]) -> set[str]:
    """The distributions pip installs for `names` (their requirements, recursively, extras left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_distribution(r) for r in requires if "extra ==" not in r]
    return seen


# Imports `federator operator` with only the given distributions importable (as in the image): a module
# of any other installed distribution fails to import, as it would there.
PROBE = """
import importlib.abc, importlib.metadata, sys
allowed = set(sys.argv[1].split(","))
owners = importlib.metadata.packages_distributions()

class OnlyTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.partition(".")[0]
        dists = {d.lower().replace("_", "-") for d in owners.get(top, [])}
        if top != "federator" and dists and not dists & allowed:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the image)", name=name)
        return None

sys.meta_path.insert(0, OnlyTheImage())
import federator.cli, federator.operator.main, federator.operator.handlers
print("torch" in sys.modules)
"""


def test_the_operator_image_installs_everything_the_operator_imports_and_no_torch() -> None:
    installs = [rest for op, rest in parse(IMAGES["operator"]).stages[0].instructions if op == "RUN"]
    named = {_distribution(word) for word in shlex.split(" ".join(installs))
             if re.match(r"^[A-Za-z][\w.-]*(>=|==|$)", word) and word not in ("pip", "install")}
    installed = _closure(named)
    assert "torch" not in installed
    result = subprocess.run([sys.executable, "-c", PROBE, ",".join(sorted(installed))], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, f"the operator needs a package operator/Dockerfile lacks:\n{result.stderr}"
    assert result.stdout.split() == ["False"], "the operator imported torch"


def test_make_images_tags_what_the_chart_and_the_api_use_by_default() -> None:
    commands = subprocess.run(["make", "-s", "-n", "images"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    tags = {image: re.search(rf"-f {image}/Dockerfile -t (\S+)", commands) for image in IMAGES}
    assert tags["operator"] and tags["operator"].group(1) == one(render(), "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["image"]
    assert tags["runtime"] and tags["runtime"].group(1) == PodTemplate().image  # spec.server/clients' default image
