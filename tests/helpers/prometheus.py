"""A real Prometheus server (Debian's `prometheus` package) on a free loopback port, started and stopped
by the caller, and the queries the chart's dashboards, alerts and adapter rule make."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from federator.local import LocalRun

INSTALL_HINT = ("Debian's prometheus package is not installed: `apt-get install -y prometheus` "
                "(.ci/run installs it before the tests)")


def binary(name: str) -> str:
    """`prometheus` or `promtool`; a missing one fails the test (never skips it) with how to install it."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    assert path, f"{name}: {INSTALL_HINT}"
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
            doc = json.load(resp)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's vector (raises on a PromQL error, with Prometheus' message)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        try:
            data = self.api("query", **params)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr}: {exc.read().decode()}") from None
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self, *instances: str) -> bool:
        """Every target (or every one of `instances`, host:port) was scraped successfully."""
        active = [t for t in self.api("targets")["activeTargets"]
                  if not instances or t["labels"]["instance"] in instances]
        return bool(active) and all(t["health"] == "up" for t in active)

    def wait(self, check: Any, timeout: float, what: str) -> Any:
        """Poll until `check()` is truthy: the event itself, with a generous bound for a busy machine."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            try:
                value = check()
            except (OSError, AssertionError):
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
            time.sleep(0.2)


@contextmanager
def run_prometheus(workdir: Path, targets: list[dict[str, Any]], rule_files: Sequence[Path] = (),
                   interval: str = "1s", jobs: Sequence[dict[str, Any]] = ()) -> Iterator[Prometheus]:
    """Prometheus scraping `targets` (static_configs entries) every `interval`, while inside; `jobs` are
    more scrape configs (the operator's own job)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "federator", "static_configs": targets}, *jobs],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        prom.wait(lambda: urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2).status == 200, 60,
                  "prometheus to be ready")
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_scraped_workers(run: LocalRun, ports: Sequence[int]) -> None:
    """`run.start_clients()` as `federator run` does it, except that each worker also serves /metrics on
    one of `ports`, as worker pods do on 9090 (`federator run` turns the workers' endpoint off)."""
    assert len(ports) == run.workers, "one port per worker"
    free = iter(ports)
    spawn = run._spawn

    def with_metrics(args: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        if args[:1] == ["client"] and "--metrics-port" in args:
            at = args.index("--metrics-port") + 1
            args = [*args[:at], str(next(free)), *args[at + 1:]]
        return spawn(args, log_name, env)

    setattr(run, "_spawn", with_metrics)  # noqa: B010 (an instance override of the method, for this call)
    try:
        run.start_clients()
    finally:
        delattr(run, "_spawn")


def federation_targets(run: LocalRun, worker_ports: Sequence[int], federation: str,
                       namespace: str) -> list[dict[str, Any]]:
    """Static targets with the labels the chart's monitors give them in a cluster: the ServiceMonitor's
    `service`, and the PodMonitor's `namespace`, `pod` and `federation` (relabelled from the pod label)."""
    server = {"targets": [f"127.0.0.1:{run.http_port}"], "labels": {"service": f"{federation}-server"}}
    workers = [{"targets": [f"127.0.0.1:{port}"],
                "labels": {"namespace": namespace, "federation": federation, "pod": f"{federation}-clients-{i}"}}
               for i, port in enumerate(worker_ports)]
    return [server, *workers]


# ------------------------------------------------------------------------- the chart's queries


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target of a Grafana dashboard."""
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def grafana_to_promql(expr: str, rate_interval: str) -> str:
    """What Grafana sends: template variables set to All (`.*`), `$__rate_interval` to a window."""
    expr = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$\{?(namespace|federation)\}?", ".*", expr)


def adapter_query(rule: dict[str, Any], namespace: str, service: str) -> str:
    """prometheus-adapter's metricsQuery for one Service, as the HPA's Object metric asks for it."""
    series = rule["name"]["as"]
    matchers = f'namespace="{namespace}",service="{service}"'
    return (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "service"))


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (identifiers that are followed by `{` or a space/paren)."""
    words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*\{", expr)) | set(re.findall(r"\b(federator_[a-z0-9_]+)", expr))
    return {w for w in words if w not in {"by", "without", "on", "ignoring"}}
