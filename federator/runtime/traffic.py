"""Bytes on the wire per direction, and what they would have been uncompressed (the compression ratio)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

DIRECTIONS = ("uplink", "downlink")


@dataclass
class Traffic:
    """Counts every gRPC message of model traffic (serialized size, as it crossed the socket) and the
    model bytes the same transfers would have been without compression; exports both as metrics."""

    sent: Counter  # bound children: federator_bytes_sent_total / _received_total
    received: Counter
    ratio: dict[str, Gauge]
    wire: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    raw: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, direction: str, wire_bytes: int, raw_bytes: int) -> None:
        with self._lock:
            self.wire[direction] += wire_bytes
            self.raw[direction] += raw_bytes
            ratio = self.ratio_of(direction)
        (self.received if direction == "uplink" else self.sent).inc(wire_bytes)
        self.ratio[direction].set(ratio)

    def ratio_of(self, direction: str) -> float:
        """Uncompressed over wire bytes so far (1.0 before any transfer)."""
        wire = self.wire[direction]
        return self.raw[direction] / wire if wire else 1.0

    def ratios(self) -> dict[str, float]:
        return {d: round(self.ratio_of(d), 3) for d in DIRECTIONS}
