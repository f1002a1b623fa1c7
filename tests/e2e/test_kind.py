"""End to end on a real cluster (kind, set up by tests/e2e/kind-up.sh; docs/e2e.md): `helm install` the
chart with Helm's engine, apply a longer quickstart with autoscaling on, wait for Succeeded, and check that
the HPA reads federator_pending_tasks through the custom metrics API and that Prometheus scrapes the
server.

Skipped unless FEDERATOR_E2E_KUBECONFIG names the cluster's kubeconfig: no container engine runs where
the rest of the suite runs. `make test` leaves tests/e2e out (pyproject's testpaths); `make e2e` runs it.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBECONFIG = os.environ.get("FEDERATOR_E2E_KUBECONFIG", "")
pytestmark = [
    pytest.mark.skipif(not KUBECONFIG, reason="needs a real cluster: bash tests/e2e/kind-up.sh, then "
                       "FEDERATOR_E2E_KUBECONFIG=$PWD/.e2e/kubeconfig make e2e (docs/e2e.md)"),
    pytest.mark.timeout(1800),
]

RELEASE, OPERATOR_NS, NS = "federator", "federator-system", "default"
PROMETHEUS = ("monitoring", "kps-kube-prometheus-stack-prometheus", 9090)  # kind-up.sh's release
GROUP, VERSION = "federator.dev", "v1alpha1"


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except AssertionError:
            raise  # a verdict (e.g. the federation failed), not a transient error
        except Exception as exc:  # the API may answer 404/503 while things start
            last = exc
        time.sleep(3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last error: {last!r}")


@pytest.fixture(scope="module")
def api() -> Any:
    import kubernetes

    return kubernetes.config.new_client_from_config(config_file=KUBECONFIG)


@pytest.fixture(scope="module")
def release(api: Any) -> Iterator[None]:
    import helm_python as helm

    values = {"monitoring": {"serviceMonitor": {"enabled": True, "interval": "15s"},
                             "prometheusRule": {"enabled": True}, "grafanaDashboards": {"enabled": True}}}
    with helm.Config(kubeconfig_path=KUBECONFIG, namespace=OPERATOR_NS) as config:
        config.install(ROOT / "charts" / "federator", RELEASE, values, namespace=OPERATOR_NS,
                       create_namespace=True, wait="watcher", timeout=600)
        try:
            yield
        finally:
            config.uninstall(RELEASE)


def get_json(api: Any, path: str, **query: str) -> Any:
    """GET a path of the API server (aggregated APIs, service proxies) as JSON."""
    raw = api.call_api(path, "GET", query_params=list(query.items()), response_type="object",
                       _preload_content=False, auth_settings=["BearerToken"])
    response = raw[0] if isinstance(raw, tuple) else raw
    return json.loads(response.data)


def prometheus_query(api: Any, expr: str) -> list[dict[str, Any]]:
    """A PromQL query through the API server's service proxy."""
    ns, svc, port = PROMETHEUS
    doc = get_json(api, f"/api/v1/namespaces/{ns}/services/{svc}:{port}/proxy/api/v1/query", query=expr)
    assert doc["status"] == "success", doc
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result


def test_the_quickstart_succeeds_scales_on_pending_tasks_and_is_scraped(api: Any, release: None) -> None:
    import kubernetes

    custom = kubernetes.client.CustomObjectsApi(api)
    doc = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text()))
    name = doc["metadata"]["name"]
    doc["spec"]["clients"]["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 3}
    # long enough (minutes, not seconds) for Prometheus, the adapter's relist and the HPA's sync to see it
    # run: a finished federation's HPA is removed
    doc["spec"]["rounds"] = 100
    doc["spec"]["training"]["localEpochs"] = 30
    doc["spec"]["monitoring"] = {"serviceMonitor": False}  # the chart's ServiceMonitor scrapes every server
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, "federations", doc)
    try:
        def phase() -> str | None:
            fed: Any = custom.get_namespaced_custom_object(GROUP, VERSION, NS, "federations", name)
            value: str | None = (fed.get("status") or {}).get("phase")
            assert value != "Failed", fed["status"]
            return value

        wait_for(lambda: phase() in ("Running", "Succeeded"), 900, "the federation to run")

        # Prometheus scrapes the server (through the chart's ServiceMonitor)
        wait_for(lambda: [s for s in prometheus_query(api, f'up{{service="{name}-server"}}') if s["value"][1] == "1"],
                 300, "Prometheus to scrape the server")
        wait_for(lambda: prometheus_query(api, f'federator_round{{federation="{name}"}}'), 300, "federator_round")

        # the custom metrics API serves the adapter's metric, and the HPA reads it
        path = f"/apis/custom.metrics.k8s.io/v1beta1/namespaces/{NS}/services/{name}-server/federator_pending_tasks"
        wait_for(lambda: get_json(api, path)["items"], 300, "federator_pending_tasks in the custom metrics API")

        def hpa_reads_the_metric() -> bool:
            hpa: Any = kubernetes.client.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler(
                f"{name}-clients", NS)
            active = [c for c in hpa.status.conditions or [] if c.type == "ScalingActive"]
            metrics = [m.object.metric.name for m in hpa.status.current_metrics or [] if m.object is not None]
            return bool(active and active[0].status == "True" and metrics == ["federator_pending_tasks"])

        wait_for(hpa_reads_the_metric, 300, "the HPA to read federator_pending_tasks")
        wait_for(lambda: phase() == "Succeeded", 900, "the federation to succeed")
    finally:
        custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "federations", name)
