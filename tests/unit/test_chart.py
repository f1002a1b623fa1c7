"""The Helm chart, rendered and linted by Helm's own engine (helm-python-sdk), validated like the API
server would (kubernetes-validate --strict, oldest and newest supported Kubernetes)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.helpers.chart import ALL_ON, CHART, NAMESPACE, by_kind, one, render, render_files
from tests.helpers.kubeschema import K8S_VERSIONS, restricted_problems, validate_upstream

ROOT = Path(__file__).resolve().parents[2]
# Kinds from other projects' CRDs (Prometheus Operator, KEDA): no upstream schema to validate against.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"), ("keda.sh/v1alpha1", "ScaledObject"),
}
SETUPS = {"defaults": {}, "all-on": ALL_ON, "namespaced": {"watchNamespaces": ["default", "team-b"], **ALL_ON}}
OPTIONAL = {  # one value turns on each optional part, and nothing else
    "monitoring.serviceMonitor.enabled": {("ServiceMonitor", "federator-servers")},
    "monitoring.podMonitor.enabled": {("PodMonitor", "federator-clients")},
    "monitoring.operatorMonitor.enabled": {("PodMonitor", "federator-operator")},
    "monitoring.prometheusRule.enabled": {("PrometheusRule", "federator")},
    "monitoring.prometheusAdapter.enabled": {("ConfigMap", "federator-adapter-rules")},
    "monitoring.grafanaDashboards.enabled": {("ConfigMap", f"federator-dashboard-{n}")
                                             for n in ("training", "communication", "byzantine")},
    "keda.enabled": {("ScaledObject", "demo-clients")},
}


def nested(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    *parents, last = dotted.split(".")
    for key in parents:
        cur = cur.setdefault(key, {})
    cur[last] = value
    return out


def names(objects: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objects}


@pytest.mark.parametrize("values", SETUPS.values(), ids=SETUPS.keys())
@pytest.mark.parametrize("kube_version", K8S_VERSIONS)
def test_helm_lint_is_clean(values: dict[str, Any], kube_version: str) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{kube_version}", namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("values", SETUPS.values(), ids=SETUPS.keys())
def test_every_object_is_valid_kubernetes(values: dict[str, Any]) -> None:
    objects = render(values)
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            assert obj["metadata"]["name"] and obj["spec"], obj
            continue
        validate_upstream(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "federator"


def test_defaults_render_the_operator_and_nothing_optional() -> None:
    objects = render()
    assert names(objects) == {("ServiceAccount", "federator"), ("ClusterRole", "federator"),
                              ("ClusterRoleBinding", "federator"), ("Deployment", "federator")}


@pytest.mark.parametrize(("value", "expected"), OPTIONAL.items(), ids=OPTIONAL.keys())
def test_each_optional_part_is_behind_one_value(value: str, expected: set[tuple[str, str]]) -> None:
    values = nested(value, True)
    if value == "keda.enabled":
        values["keda"]["federations"] = [{"name": "demo", "namespace": "default"}]
    assert names(render(values)) - names(render()) == expected


def test_the_operator_pod_is_restricted_and_probed_on_kopfs_liveness() -> None:
    deployment = one(render(), "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_problems(pod) == []
    [container] = pod["containers"]
    assert container["image"] == "ghcr.io/federator/operator:0.1.0"  # the chart's appVersion, what `make images` tags
    assert container["command"] == ["federator", "operator"]
    assert container["args"] == ["--all-namespaces", "--liveness=http://0.0.0.0:8081/healthz", "--metrics-port=8080"]
    probe = container["livenessProbe"]["httpGet"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}[probe["port"]]
    assert (probe["path"], port) == ("/healthz", 8081)
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # each Federation's NetworkPolicy admits pods with this name to the server's /status
    assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "federator-operator"
    assert pod["serviceAccountName"] == one(render(), "ServiceAccount")["metadata"]["name"]


def test_watch_namespaces_scope_the_operator_and_the_monitors() -> None:
    objects = render({"watchNamespaces": ["default", "team-b"], **ALL_ON})
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["--namespace=default", "--namespace=team-b"]
    assert "--all-namespaces" not in container["args"]
    monitors = {m["metadata"]["name"]: m for m in by_kind(objects, "ServiceMonitor") + by_kind(objects, "PodMonitor")}
    for name in ("federator-servers", "federator-clients"):
        assert monitors[name]["spec"]["namespaceSelector"] == {"matchNames": ["default", "team-b"]}
    # the operator's own metrics are where the operator runs, whatever it watches
    assert monitors["federator-operator"]["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    subjects = {(s["name"], s["namespace"]) for b in by_kind(objects, "RoleBinding") for s in b["subjects"]}
    assert subjects == {("federator", NAMESPACE)}


def test_operator_settings_reach_its_environment() -> None:
    values = {"operator": {"statusInterval": 5, "startupGrace": 60, "verbose": True,
                           "extraEnv": [{"name": "EXTRA", "value": "1"}]}}
    container = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FEDERATOR_STATUS_INTERVAL"] == "5" and env["FEDERATOR_STARTUP_GRACE"] == "60"
    assert env["EXTRA"] == "1" and "--verbose" in container["args"]


# ------------------------------------------------------------------------------------------- CRDs


def test_the_chart_ships_the_generated_crds_unchanged() -> None:
    generated = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    with helm.Chart.load(CHART) as chart:
        shipped = {Path(c["filename"]).name: c["data"] for c in chart.crds}
    assert set(shipped) == set(generated) == {"federations.federator.dev.yaml", "federatedclients.federator.dev.yaml"}
    drifted = sorted(name for name in generated if shipped[name] != generated[name])
    fix = "`python -m federator crds --out crds && python -m federator crds --out charts/federator/crds`"
    assert not drifted, f"charts/federator/crds/ differs from crds/ in {drifted}: run `make crds`, or {fix}"


# ------------------------------------------------------------------------------------------ values


BAD_VALUES = [
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"watchNamespaces": ["Team_B"]}, "/watchNamespaces/0"),
    ({"operator": {"statusInterval": "fast"}}, "/operator/statusInterval"),
    ({"operator": {"livenessPort": 70000}}, "/operator/livenessPort"),
    ({"operator": {"metricsPort": "http"}}, "/operator/metricsPort"),
    ({"monitoring": {"operatorMonitor": {"enabled": "yes"}}}, "/monitoring/operatorMonitor/enabled"),
    ({"monitoring": {"serviceMonitr": {"enabled": True}}}, "serviceMonitr"),
    ({"monitoring": {"prometheusRule": {"stalledFor": "15 minutes"}}}, "/monitoring/prometheusRule/stalledFor"),
    ({"keda": {"enabled": True, "federations": [{"name": "demo"}]}}, "/keda/federations/0"),
    ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
]


@pytest.mark.parametrize(("values", "named"), BAD_VALUES, ids=[n for _, n in BAD_VALUES])
def test_bad_values_fail_at_install_naming_the_value(values: dict[str, Any], named: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)  # what `helm install` runs: the schema first
    assert named in str(err.value)


def test_values_yaml_is_documented_line_by_line() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = [
        line for i, line in enumerate(lines)
        if re.match(r"^\s*[A-Za-z_]+:", line) and not lines[i - 1].lstrip().startswith("#")
        and not re.match(r"^\s+(cpu|memory):", line)  # quantities inside a documented requests/limits
    ]
    assert undocumented == []


def test_the_schema_covers_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> list[str]:
        missing = []
        for key, value in values.items():
            sub = (node.get("properties") or {}).get(key)
            if sub is None:
                missing.append(f"{path}.{key}")
            elif isinstance(value, dict) and "properties" in sub:
                missing += walk(value, sub, f"{path}.{key}")
        return missing

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert walk(defaults, schema, "") == []
    assert schema["additionalProperties"] is False  # a misspelt top-level value fails


# ------------------------------------------------------------------------------- optional parts


def test_dashboards_are_grafana_json_with_prometheus_queries() -> None:
    objects = render({"monitoring": {"grafanaDashboards": {"enabled": True}}})
    maps = [o for o in by_kind(objects, "ConfigMap") if "dashboard" in o["metadata"]["name"]]
    titles = set()
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        [(filename, text)] = cm["data"].items()
        assert text == (CHART / "dashboards" / filename).read_text().rstrip("\n")
        board = json.loads(text)
        titles.add(board["title"])
        assert board["panels"] and all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in board["panels"])
    assert titles == {"Federator / Training overview", "Federator / Communication", "Federator / Byzantine detection"}


def test_the_adapter_rule_exposes_pending_tasks_per_server_service() -> None:
    cm = one(render({"monitoring": {"prometheusAdapter": {"enabled": True}}}), "ConfigMap")
    [rule] = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == "federator_pending_tasks"
    # each Federation's HPA asks for the metric of its Service <name>-server (operator/children.py)
    assert rule["resources"]["overrides"]["service"] == {"resource": "service"}


def test_keda_scales_each_listed_federations_worker_pool() -> None:
    values = {"keda": {"enabled": True, "federations": [{"name": "demo", "namespace": "lab", "maxReplicas": 6,
                                                         "pendingTasksPerWorker": 3}]}}
    scaled = one(render(values), "ScaledObject")
    assert scaled["metadata"]["namespace"] == "lab"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "demo-clients"
    assert scaled["spec"]["maxReplicaCount"] == 6
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["metadata"]["threshold"] == "3"
    assert 'federation="demo"' in trigger["metadata"]["query"]


def test_notes_say_what_to_do_next() -> None:
    notes = render_files({"watchNamespaces": ["lab"]})["federator/templates/NOTES.txt"]
    assert "watches lab" in notes
    assert "kubectl apply -f examples/quickstart.yaml" in notes
    assert "kubectl apply --server-side -f" in notes  # Helm never upgrades CRDs


def test_the_pod_monitor_labels_client_metrics_with_their_federation() -> None:
    monitor = one(render({"monitoring": {"podMonitor": {"enabled": True}}}), "PodMonitor")
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"  # the client container's port name (operator/children.py)
    # client metrics have no federation label; the dashboards select by it
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_federator_dev_federation"],
            "targetLabel": "federation"} in endpoint["relabelings"]


def test_the_operator_monitor_scrapes_the_operators_metrics_port_under_one_job() -> None:
    values = {"operator": {"metricsPort": 9100}, "monitoring": {"operatorMonitor": {"enabled": True}}}
    objects = render(values)
    deployment = one(objects, "Deployment")
    monitor = one(objects, "PodMonitor")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-port=9100" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["path"], ports[endpoint["port"]]) == ("/metrics", 9100)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": "federator-operator"}]


@pytest.mark.parametrize(("on", "reads"), [(False, "kube_deployment_status_replicas_available{"),
                                           (True, 'up{job="federator-operator", namespace="federator-system"}')],
                         ids=["kube-state-metrics", "operator-monitor"])
def test_the_operator_down_alert_reads_the_operator_monitor_when_it_is_on(on: bool, reads: str) -> None:
    values = {"monitoring": {"prometheusRule": {"enabled": True}, "operatorMonitor": {"enabled": on}}}
    rules = [r for g in one(render(values), "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    [down] = [r for r in rules if r.get("alert") == "FederatorOperatorDown"]
    assert reads in down["expr"]
