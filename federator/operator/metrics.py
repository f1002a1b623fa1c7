"""The operator's Prometheus metrics (`federator_operator_*`), served by `federator operator --metrics-port`.

One registry per process (`REGISTRY`): reconcile passes by kind and outcome and their duration, every
Kubernetes API request by verb and outcome (kube.py counts them), and the managed Federations by the
phase their status last said. kopf's liveness endpoint stays where it is; this is the scrape target.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Literal

import kopf
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

ReconcileOutcome = Literal["ok", "invalid_spec", "temporary_error", "immutable_field", "error"]
REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "federator_operator_reconcile_total", "Reconcile passes, by kind (Federation, FederatedClient) and outcome.",
    ["kind", "outcome"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram(
    "federator_operator_reconcile_duration_seconds", "Duration of one reconcile pass, by kind.", ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0), registry=REGISTRY)
API_REQUESTS = Counter(
    "federator_operator_api_requests_total", "Kubernetes API requests of the operator, by verb and outcome.",
    ["verb", "outcome"], registry=REGISTRY)


class InvalidSpecError(kopf.PermanentError):
    """A spec the operator cannot run (reported on the object; kopf does not retry)."""


class RefusedChangeError(kopf.PermanentError):
    """A change of an immutable field, refused (reported on the object; kopf does not retry)."""


def reconcile_outcome(exc: BaseException | None, refused: bool = False) -> ReconcileOutcome:
    """The outcome label of a pass that raised `exc` (None: returned; `refused`: it refused a change)."""
    if exc is None:
        return "immutable_field" if refused else "ok"
    if isinstance(exc, RefusedChangeError):
        return "immutable_field"
    if isinstance(exc, InvalidSpecError):
        return "invalid_spec"
    if isinstance(exc, kopf.TemporaryError):
        return "temporary_error"
    return "error"


def api_outcome(status: int | None) -> str:
    """The outcome label of an API request: its HTTP status class, or `unreachable` without an answer."""
    if status is None:
        return "unreachable"
    if status < 400:
        return "ok"
    return {404: "not_found", 409: "conflict", 422: "invalid"}.get(status, "client_error" if status < 500
                                                                    else "server_error")


class Pass:
    """What a reconcile pass reports about itself besides raising (a refusal during a resync returns)."""

    refused: bool = False


@asynccontextmanager
async def observed_reconcile(kind: str) -> AsyncIterator[Pass]:
    """Count one reconcile pass of `kind` with its outcome, and time it."""
    this = Pass()
    started = time.perf_counter()
    try:
        yield this
    except BaseException as exc:
        RECONCILES.labels(kind, reconcile_outcome(exc)).inc()
        raise
    else:
        RECONCILES.labels(kind, reconcile_outcome(None, this.refused)).inc()
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)


class FederationPhases(Collector):
    """`federator_operator_federations{phase}`: the Federations this operator manages, by status phase."""

    def __init__(self) -> None:
        self.phases: dict[str, str] = {}  # uid -> phase

    def set(self, uid: str, phase: str | None) -> None:
        self.phases[uid] = phase or "Pending"

    def forget(self, uid: str) -> None:
        self.phases.pop(uid, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("federator_operator_federations",
                                   "Federations managed by this operator, by the phase of their status.",
                                   labels=["phase"])
        counts: dict[str, int] = {}
        for phase in list(self.phases.values()):
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in sorted(counts.items()):
            family.add_metric([phase], count)
        yield family


PHASES = FederationPhases()
REGISTRY.register(PHASES)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` in a background thread (-1: not at all)."""
    if port < 0:
        return
    try:
        start_http_server(port, addr=addr, registry=REGISTRY)
    except OSError as exc:
        raise SystemExit(f"federator operator: cannot serve metrics on port {port} ({exc.strerror}); "
                         f"choose another with --metrics-port, or -1 for none") from None
