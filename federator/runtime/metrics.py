"""Prometheus metrics of the server and the clients (names from DESIGN section 6).

Each process builds its own registry, so several servers can live in one test process.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# One task of a small model trains in milliseconds (the quickstart's take 5-10 ms): the task histogram starts
# lower than the round one, so its quantiles still mean something there.
TASK_BUCKETS = (0.0025, 0.005, 0.01, 0.025, *ROUND_BUCKETS)
LABELS = ("federation", "namespace")


@dataclass
class ServerMetrics:
    registry: CollectorRegistry
    round: Gauge
    rounds_total: Counter
    round_duration: Histogram
    accuracy: Gauge
    loss: Gauge
    clients_connected: Gauge
    updates: Counter
    rejections: Counter
    bytes_sent: Counter
    bytes_received: Counter
    compression_ratio: Gauge
    byzantine_flagged: Counter
    anomaly_score: Gauge
    pending_tasks: Gauge

    @classmethod
    def create(cls, federation: str, namespace: str) -> ServerMetrics:
        reg = CollectorRegistry()
        lv = {"federation": federation, "namespace": namespace}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=reg)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, (*LABELS, *extra), registry=reg)

        m = cls(
            registry=reg,
            round=gauge("federator_round", "Last completed round"),
            rounds_total=counter("federator_rounds", "Rounds completed"),
            round_duration=Histogram(
                "federator_round_duration_seconds", "Wall time of a round", LABELS,
                buckets=ROUND_BUCKETS, registry=reg,
            ),
            accuracy=gauge("federator_model_accuracy", "Global model accuracy on held-out data"),
            loss=gauge("federator_model_loss", "Global model loss on held-out data"),
            clients_connected=gauge("federator_clients_connected", "Workers and silos currently joined"),
            updates=counter("federator_client_updates", "Client updates by outcome", ("outcome",)),
            rejections=counter("federator_update_rejections", "Rejected updates by reason", ("reason",)),
            bytes_sent=counter("federator_bytes_sent", "Bytes of model messages sent to workers (gRPC message sizes)"),
            bytes_received=counter("federator_bytes_received",
                                   "Bytes of update messages received from workers (gRPC message sizes)"),
            compression_ratio=Gauge("federator_compression_ratio",
                                    "Uncompressed model bytes over wire bytes, per direction (uplink, downlink)",
                                    (*LABELS, "direction"), registry=reg),
            byzantine_flagged=counter("federator_byzantine_flagged", "Updates flagged as Byzantine and left out",
                                      ("reason",)),
            anomaly_score=Gauge("federator_client_anomaly_score", "Last anomaly score of a client's update",
                                (*LABELS, "client"), registry=reg),
            pending_tasks=gauge("federator_pending_tasks", "Training tasks queued and not yet assigned"),
        )
        # bind the constant labels once; children are what the server updates
        for metric in (m.round, m.accuracy, m.loss, m.clients_connected, m.pending_tasks):
            metric.labels(**lv)
        for c in (m.rounds_total, m.bytes_sent, m.bytes_received):
            c.labels(**lv)
        for reason in ("norm", "cosine", "krum"):
            m.byzantine_flagged.labels(**lv, reason=reason)
        for outcome in ("accepted", "rejected", "late"):
            m.updates.labels(**lv, outcome=outcome)
        m.round_duration.labels(**lv)
        for direction in ("uplink", "downlink"):
            m.compression_ratio.labels(**lv, direction=direction).set(1.0)
        return m


@dataclass
class ClientMetrics:
    registry: CollectorRegistry
    train_seconds: Histogram
    samples: Counter
    tasks: Counter

    @classmethod
    def create(cls) -> ClientMetrics:
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            train_seconds=Histogram(
                "federator_client_train_seconds", "Local training time of one task", ("client",),
                buckets=TASK_BUCKETS, registry=reg,
            ),
            samples=Counter("federator_client_samples", "Samples trained on", ("client",), registry=reg),
            tasks=Counter("federator_client_tasks", "Tasks finished by outcome", ("outcome",), registry=reg),
        )
