"""The runtime's Prometheus families: what their buckets can resolve."""

from __future__ import annotations

from federator.runtime.metrics import ClientMetrics


def _bucket_counts(metrics: ClientMetrics, client: str) -> dict[float, float]:
    counts: dict[float, float] = {}
    for family in metrics.registry.collect():
        if family.name != "federator_client_train_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels["client"] == client:
                counts[float(sample.labels["le"])] = sample.value
    return counts


def test_task_histogram_separates_millisecond_tasks() -> None:
    """A 4 ms and a 20 ms task (the quickstart's range) land in different buckets, below the round's lowest."""
    metrics = ClientMetrics.create()
    metrics.train_seconds.labels(client="c0").observe(0.004)
    metrics.train_seconds.labels(client="c0").observe(0.02)
    counts = _bucket_counts(metrics, "c0")
    below_5ms = [le for le in counts if le <= 0.005]
    assert below_5ms, sorted(counts)
    assert counts[max(below_5ms)] == 1  # only the 4 ms task
    assert counts[0.025] == 2
    assert counts[0.0025] == 0
