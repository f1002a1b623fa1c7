"""What the server sends a worker that asks for a task: nothing, a compressed delta, or the full model.

The server keeps the model its workers hold (`held`), one copy however many workers and simulated clients
there are. With `compression.downlink.bits` below 32, each new global model goes out as a quantised delta
from the previous `held` to any worker that holds that previous version, and `held` moves by exactly what
the workers apply; a new worker, or one more than a version behind, gets the full `held`. Uplink deltas
are decoded against `held` too: it is what the clients trained from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from federator.api.models import DownlinkCompressionSpec
from federator.runtime import compression as comp
from federator.runtime.training import Params
from federator.runtime.transport import Encoded, encode


@dataclass(frozen=True)
class Offer:
    """Weights for one task: `encoded` to stream, and whether it is a delta (from `delta_base`)."""

    encoded: Encoded | None  # None: the worker already holds this version
    compressed: bool
    delta_base: int
    raw_bytes: int  # what the full model would have taken: the uncompressed side of the ratio


@dataclass(frozen=True)
class Pending:
    version: int
    held: Params
    delta: Encoded | None
    full: Encoded  # `held` ready to stream (without compression its frames are built once for every worker)


class Downlink:
    def __init__(self, spec: DownlinkCompressionSpec, held: Params, version: int, chunk_bytes: int) -> None:
        self.scheme = comp.Scheme(bits=spec.bits, chunk=spec.chunk) if spec.enabled else None
        self.chunk_bytes = chunk_bytes
        self.held = held
        self.version = version
        self.full = encode(held, chunk_bytes)
        if self.scheme is None:
            self.full = self.full.prebuilt()
        self.delta: Encoded | None = None
        self.delta_base = 0

    def prepare(self, params: Params, version: int) -> Pending:
        """The step to the global model `params` as `version` (to checkpoint before `commit`)."""
        if self.scheme is None:
            return Pending(version, params, None, encode(params, self.chunk_bytes).prebuilt())
        step = comp.downlink_step(self.held, params, self.scheme, np.random.default_rng(version))
        delta = encode(comp.payload_tensors(step.payload), self.chunk_bytes).prebuilt()
        # the full model goes only to a new or lagging worker: its frames are built when sent
        return Pending(version, step.held, delta, encode(step.held, self.chunk_bytes))

    def commit(self, step: Pending) -> None:
        self.delta = step.delta
        self.delta_base = self.version if step.delta is not None else 0
        self.held, self.version = step.held, step.version
        self.full = step.full

    def offer(self, have_version: int) -> Offer:
        raw = self.full.total_bytes
        if have_version == self.version:
            return Offer(None, False, 0, 0)
        if self.delta is not None and have_version == self.delta_base:
            return Offer(self.delta, True, self.delta_base, raw)
        return Offer(self.full, False, 0, raw)
