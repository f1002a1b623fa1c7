"""`federator operator` as a process against kmock's emulator (the fixtures of tests/integration/conftest.py),
with its /metrics endpoint: for tests that scrape the operator's own metrics.

The emulator runs in an event loop of its own thread, so synchronous tests (a module-scoped Prometheus
fixture) can use it as well as async ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.prometheus import free_port
from tests.integration.conftest import ApiServer, crd_resources, kubeconfig_for

FEDS_URL = "/apis/federator.dev/v1alpha1/namespaces/default/federations"


def federation(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "federator.dev/v1alpha1", "kind": "Federation",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"rounds": 5, "clients": {"count": 10, "perRound": 8, "workers": 2}, **spec}}


# perRound above count: the operator's validation refuses it (spec.clients)
INVALID_SPEC = {"clients": {"count": 10, "perRound": 20}}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    """The sample `name{labels}` of a /metrics page, 0 when absent (a counter not yet incremented)."""
    return samples(text).get((name, frozenset(labels.items())), 0.0)


@dataclass
class OperatorProcess:
    api_url: str
    metrics_url: str
    process: subprocess.Popen[bytes]
    loop: asyncio.AbstractEventLoop
    api: ApiServer

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            text: str = resp.read().decode()
            return text

    def scrape_until(self, check: Any, what: str, timeout: float = 60) -> str:
        """The first /metrics page for which `check(page)` holds."""
        def page() -> str | None:
            text = self.scrape()
            return text if check(text) else None
        result: str = self.wait(page, timeout, what)
        return result

    def create(self, body: dict[str, Any]) -> None:
        request = urllib.request.Request(self.api_url + FEDS_URL, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status < 300

    def exists(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.api_url + path, timeout=5) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:
            return False

    def wait(self, check: Any, timeout: float, what: str) -> Any:
        """Wait on the event itself, with a generous bound (a busy machine is slow, never wrong)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"the operator exited with {self.process.returncode}"
            try:
                result = check()
                if result:
                    return result
            except OSError:
                pass
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
            time.sleep(0.2)


@contextmanager
def operator_process(workdir: Path, metrics_port: int | None = None) -> Iterator[OperatorProcess]:
    """kmock's emulator in a thread and `federator operator --metrics-port` scraping nothing but itself."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready: queue.Queue[tuple[asyncio.AbstractEventLoop, asyncio.Event, ApiServer]] = queue.Queue()

    async def serve() -> None:
        stop = asyncio.Event()
        async with ApiServer() as server, kmock.Server(server):
            crd_resources(server)
            ready.put((asyncio.get_running_loop(), stop, server))
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    loop, stop, server = ready.get(timeout=60)
    port = metrics_port or free_port()
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(kubeconfig_for(server)))
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env.update(KUBECONFIG=str(kubeconfig), FEDERATOR_STATUS_INTERVAL="0.5")
    log = (workdir / "operator.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "federator", "operator", "--all-namespaces",
         f"--liveness=http://127.0.0.1:{free_port()}/healthz", f"--metrics-port={port}"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    op = OperatorProcess(api_url=str(server.url).rstrip("/"), metrics_url=f"http://127.0.0.1:{port}/metrics",
                         process=process, loop=loop, api=server)
    try:
        op.wait(op.scrape, 60, "the operator's /metrics")
        yield op
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
