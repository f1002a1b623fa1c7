"""A real Prometheus server scrapes a running federation (`federator server` and its workers, as
`federator run` starts them) and `federator operator` against kmock: every query of the chart's
dashboards, alerts and adapter rule runs on the live metric names and returns data; the alerts pass
`promtool check rules` and `promtool test rules`.

Debian's `prometheus` package must be installed (.ci/run does it); without it these tests fail, with
the command that installs it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from federator.api.manifest import load_federation
from federator.local import LocalRun
from tests.helpers.chart import CHART, one, render
from tests.helpers.manifests import manifest, write_manifest
from tests.helpers.operator_process import INVALID_SPEC, federation, operator_process
from tests.helpers.prometheus import (
    Prometheus,
    adapter_query,
    binary,
    dashboard_queries,
    federation_targets,
    free_port,
    grafana_to_promql,
    metric_names,
    run_prometheus,
    start_scraped_workers,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
ROUNDS = 6
SCRAPE_INTERVAL = "250ms"  # workers live for only the seconds they train: rate() needs two scrapes of them
FEDERATION, NAMESPACE = "demo", "default"
# Metrics the rules read from elsewhere (not the runtime), each with where it comes from.
EXTERNAL = {"kube_deployment_status_replicas_available": "kube-state-metrics (FederatorOperatorDown)"}
OPERATOR_MONITOR = {"monitoring": {"prometheusRule": {"enabled": True}, "operatorMonitor": {"enabled": True}}}
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))


@dataclass
class Scrape:
    prom: Prometheus
    at: float  # a time after the last round, when Prometheus had scraped it
    window: str  # a rate window that spans the whole federation


def rules_doc(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The PrometheusRule's groups as a Prometheus rule file (what the Prometheus Operator loads)."""
    rule = one(render(values or {"monitoring": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def alerts(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [r for group in rules_doc(values)["groups"] for r in group["rules"] if "alert" in r]


def operator_job() -> dict[str, Any]:
    """The scrape config the chart's operator PodMonitor amounts to: its job label, the release namespace."""
    monitor = one(render(OPERATOR_MONITOR), "PodMonitor")
    [relabel] = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert relabel["targetLabel"] == "job"
    return {"job_name": relabel["replacement"], "namespace": monitor["metadata"]["namespace"]}


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    """A federation of ROUNDS rounds, its server and workers scraped from before its first round until after
    its last."""
    tmp = tmp_path_factory.mktemp("prometheus")
    # local epochs enough that the workers train for seconds, not a fraction of one (on digits a round of
    # one epoch takes ~40 ms): their /metrics must be scraped more than once to give rate() two samples
    doc = manifest(rounds=ROUNDS, training={"localEpochs": 25},
                   # detection scores every update (the anomaly-score panel); honest digits clients score
                   # about 0.5, far below this threshold, so nothing is flagged and no alert fires
                   byzantine={"detection": {"method": "cosine", "threshold": 1.5}})
    doc["metadata"] = {"name": FEDERATION, "namespace": NAMESPACE}
    path = write_manifest(tmp / "demo.yaml", doc)
    out = tmp / "run"
    (out / "state").mkdir(parents=True)
    run = LocalRun(manifest=path, fed=load_federation(path), out=out, workers=2, linger_seconds=-1)
    worker_ports = [free_port(), free_port()]
    job = operator_job()
    started = time.time()
    try:
        run.start_server()
        targets = federation_targets(run, worker_ports, FEDERATION, NAMESPACE)
        with operator_process(tmp / "operator") as op, run_prometheus(
                tmp / "prom", targets, interval=SCRAPE_INTERVAL, jobs=[{
                    "job_name": job["job_name"], "static_configs": [{
                        "targets": [op.metrics_url.split("/")[2]], "labels": {"namespace": job["namespace"]}}]}],
        ) as prom:
            # the operator reconciles one Federation and refuses an invalid one while Prometheus watches
            op.create(federation(FEDERATION))
            op.create(federation("broken", **INVALID_SPEC))
            prom.wait(lambda: prom.targets_up(f"127.0.0.1:{run.http_port}"), 120, "the server's /metrics scraped")
            prom.wait(lambda: prom.query('federator_operator_reconcile_total{outcome="invalid_spec"}'), 120,
                      "the operator's reconciles scraped")
            start_scraped_workers(run, worker_ports)
            prom.wait(lambda: (run.status() or {}).get("phase") == "Succeeded", 300, "the federation to finish")
            prom.wait(lambda: [s for s in prom.query("federator_rounds_total") if float(s["value"][1]) == ROUNDS],
                      120, f"a scrape that saw round {ROUNDS}")
            at = time.time()
            yield Scrape(prom=prom, at=at, window=f"{int(at - started) + 60}s")
    finally:
        run.stop()


def test_every_dashboard_panel_returns_data(scrape: Scrape) -> None:
    empty = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for title, expr in dashboard_queries(board):
            promql = grafana_to_promql(expr, scrape.window)
            if not scrape.prom.query(promql, at=scrape.at):
                empty.append(f"{path.name}: {title}: {promql}")
    assert empty == [], "panels without data (a metric the runtime does not export?):\n" + "\n".join(empty)


def test_the_dashboard_variables_list_the_federation(scrape: Scrape) -> None:
    for path in DASHBOARDS:
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        # label_values(federator_round, namespace) and label_values(federator_round{...}, federation)
        for label in ("namespace", "federation"):
            metric = variables[label]["definition"].split("(", 1)[1].split(",")[0].split("{")[0]
            values = scrape.prom.api(f"label/{label}/values", **{"match[]": metric})
            assert (NAMESPACE if label == "namespace" else FEDERATION) in values, (path.name, label)


def test_the_training_panels_show_this_federation(scrape: Scrape) -> None:
    def value(expr: str) -> float:
        [sample] = scrape.prom.query(grafana_to_promql(expr, scrape.window), at=scrape.at)
        assert sample["metric"]["federation"] == FEDERATION
        return float(sample["value"][1])

    board = json.loads((CHART / "dashboards" / "training.json").read_text())
    exprs = {title: expr for title, expr in dashboard_queries(board)}
    assert value(exprs["Round"]) == ROUNDS
    assert 0.0 < value(exprs["Accuracy"]) <= 1.0
    assert value(exprs["Loss"]) > 0.0


def test_every_alert_reads_live_metrics_and_is_valid_promql(scrape: Scrape) -> None:
    for alert in alerts():
        expr = alert["expr"]
        scrape.prom.query(expr, at=scrape.at)  # PromQL the server accepts
        for name in metric_names(expr):
            if name in EXTERNAL:
                continue
            assert name.startswith("federator_"), f"{alert['alert']}: {name} is neither the runtime's nor EXTERNAL"
            assert scrape.prom.query(name, at=scrape.at), f"{alert['alert']}: no series {name}"


def test_the_operator_down_alert_reads_the_operator_scrape_when_its_monitor_is_on(scrape: Scrape) -> None:
    [down] = [a for a in alerts(OPERATOR_MONITOR) if a["alert"] == "FederatorOperatorDown"]
    assert metric_names(down["expr"]) == {"up"}
    job = operator_job()
    [target] = scrape.prom.query(f'up{{job="{job["job_name"]}", namespace="{job["namespace"]}"}}', at=scrape.at)
    assert float(target["value"][1]) == 1.0  # the alert's selector matches the scraped operator
    assert scrape.prom.query(down["expr"], at=scrape.at) == []  # and it is up: nothing fires


def test_the_operator_panels_show_its_reconciles(scrape: Scrape) -> None:
    outcomes = {s["metric"]["outcome"]: float(s["value"][1]) for s in scrape.prom.query(
        'sum by (outcome) (federator_operator_reconcile_total{kind="Federation"})', at=scrape.at)}
    assert outcomes["ok"] >= 1 and outcomes["invalid_spec"] == 1, outcomes
    [managed] = scrape.prom.query("sum(federator_operator_federations)", at=scrape.at)
    assert float(managed["value"][1]) == 2  # demo and broken


def test_a_healthy_federation_fires_no_alert(scrape: Scrape) -> None:
    for alert in alerts():
        if set(metric_names(alert["expr"])) & set(EXTERNAL):
            continue
        assert scrape.prom.query(alert["expr"], at=scrape.at) == [], alert["alert"]


def test_the_adapter_rule_serves_pending_tasks_of_the_server_service(scrape: Scrape) -> None:
    cm = one(render({"monitoring": {"prometheusAdapter": {"enabled": True}}}), "ConfigMap")
    [rule] = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    series = rule["seriesQuery"].strip("'")
    assert scrape.prom.query(series, at=scrape.at), f"the adapter would discover no series: {series}"
    [sample] = scrape.prom.query(adapter_query(rule, NAMESPACE, f"{FEDERATION}-server"), at=scrape.at)
    assert sample["metric"] == {"service": f"{FEDERATION}-server"}
    assert float(sample["value"][1]) == 0.0  # finished: nothing pending


def test_the_keda_trigger_query_returns_pending_tasks(scrape: Scrape) -> None:
    values = {"keda": {"enabled": True, "federations": [{"name": FEDERATION, "namespace": NAMESPACE}]}}
    [trigger] = one(render(values), "ScaledObject")["spec"]["triggers"]
    [sample] = scrape.prom.query(trigger["metadata"]["query"], at=scrape.at)
    assert float(sample["value"][1]) == 0.0


# ------------------------------------------------------------------------------------------ promtool


def write_rules(tmp_path: Path, values: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "federator-rules.yaml"
    path.write_text(yaml.safe_dump(rules_doc(values), sort_keys=False))
    return path


RULE_SETS = {"defaults": (None, "alerts.promtool.yaml"),
             "operator-monitor": (OPERATOR_MONITOR, "alerts-operator-monitor.promtool.yaml")}


@pytest.mark.parametrize("values", [v for v, _ in RULE_SETS.values()], ids=RULE_SETS.keys())
def test_promtool_checks_the_rules(tmp_path: Path, values: dict[str, Any] | None) -> None:
    result = subprocess.run([binary("promtool"), "check", "rules", str(write_rules(tmp_path, values))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alerts(values))} rules found" in result.stdout


@pytest.mark.parametrize(("values", "file"), RULE_SETS.values(), ids=RULE_SETS.keys())
def test_promtool_unit_tests_cover_each_alert(tmp_path: Path, values: dict[str, Any] | None, file: str) -> None:
    tests = yaml.safe_load((HERE / file).read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]
              if case.get("exp_alerts")}
    expected = {a["alert"] for a in alerts(values)} if values is None else {"FederatorOperatorDown"}
    assert tested == expected, "every alert needs a test in which it fires"
    tests["rule_files"] = [str(write_rules(tmp_path, values))]
    (tmp_path / "alerts.test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([binary("promtool"), "test", "rules", str(tmp_path / "alerts.test.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
