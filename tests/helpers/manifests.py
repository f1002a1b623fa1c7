"""Small Federation manifests for tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

BASE: dict[str, Any] = {
    "apiVersion": "federator.dev/v1alpha1",
    "kind": "Federation",
    "metadata": {"name": "test"},
    "spec": {
        "rounds": 3,
        "model": {"name": "mlp", "hiddenSizes": [32]},
        "data": {"dataset": "digits", "seed": 0},
        "training": {"localEpochs": 1, "batchSize": 32, "learningRate": 0.1},
        "clients": {"count": 4, "perRound": 4, "minPerRound": 2, "roundTimeoutSeconds": 30, "workers": 2},
    },
}


def manifest(**spec_overrides: Any) -> dict[str, Any]:
    """BASE with spec sections merged one level deep (`clients={"count": 2}` keeps the other client fields)."""
    doc = copy.deepcopy(BASE)
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key].update(value)
        else:
            doc["spec"][key] = value
    return doc


def write_manifest(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
