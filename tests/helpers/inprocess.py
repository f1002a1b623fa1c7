"""A whole federation in one test process: a real FederationServer and real Workers over gRPC on loopback."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federator.api.models import Federation
from federator.runtime.client import Worker
from federator.runtime.server import FederationServer

TOKEN = "t"

MakeWorker = Callable[[Federation, str, int], Worker]


def plain_worker(fed: Federation, address: str, i: int) -> Worker:
    return Worker(fed, address, TOKEN, name=f"w{i}")


def run_in_process(doc: dict[str, Any], state_dir: Path, workers: int = 2, join_seconds: float = 30.0,
                   make_worker: MakeWorker = plain_worker) -> tuple[FederationServer, list[Worker]]:
    """Run every round of `doc` with `workers` worker threads; returns the stopped server and the workers."""
    fed = Federation.model_validate(doc)
    server = FederationServer(fed, state_dir, [TOKEN]).start()
    ws = [make_worker(fed, f"127.0.0.1:{server.port}", i) for i in range(workers)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in ws]
    for t in threads:
        t.start()
    try:
        server.run()
        for t in threads:
            t.join(join_seconds)
    finally:
        for w in ws:
            w.close()
        server.stop()
    return server, ws
