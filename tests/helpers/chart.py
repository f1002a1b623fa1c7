"""The Helm chart rendered by Helm's own engine (helm-python-sdk: Helm's Go SDK, no binary, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "federator"
RELEASE, NAMESPACE = "federator", "federator-system"

# Every optional part of the chart switched on.
ALL_ON: dict[str, Any] = {
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "podMonitor": {"enabled": True},
        "operatorMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboards": {"enabled": True, "annotations": {"grafana_folder": "Federator"}},
        "prometheusAdapter": {"enabled": True},
    },
    "keda": {"enabled": True, "federations": [{"name": "demo", "namespace": "default", "maxReplicas": 6}]},
}


def render_files(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, as `helm install` renders it (values checked against the schema)."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=namespace, is_install=True)


def render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every object the chart renders (NOTES.txt left out)."""
    objects = []
    for path, text in sorted(render_files(values, namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [obj] = by_kind(objects, kind)
    return obj
