"""What the server sends a worker that asks for a task: nothing, compressed steps, or the full model.

The server keeps the model its workers hold (`held`), one copy however many workers and simulated clients
there are. With `compression.downlink.bits` below 32, each new global model becomes one quantised step from
the previous `held`, and `held` moves by exactly what a worker applies. The server keeps the last
`compression.downlink.history` steps (their payloads: about history x parameters x bits / 8 bytes). A worker
that holds a version K <= history steps back gets those K steps, oldest first, and applies them in order: it
then holds `held` bit for bit, as if it had taken every round's step. A single direct delta from its version
would be smaller, but it would leave the worker one quantisation error away from `held`, an error that stays
in its copy and adds up over later catch-ups, while uplink deltas are decoded against `held`. When the K steps
would be as large as the full model, when the worker is new, or further behind, it gets the full `held`.
Uplink deltas are decoded against `held` too: it is what the clients trained from.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from federator.api.models import DownlinkCompressionSpec
from federator.runtime import compression as comp
from federator.runtime.training import Params
from federator.runtime.transport import Encoded, encode

log = logging.getLogger("federator.server")


@dataclass(frozen=True)
class Offer:
    """Weights for one task: `encoded` to stream, and whether it is compressed steps (from `delta_base`)."""

    encoded: Encoded | None  # None: the worker already holds this version
    compressed: bool
    delta_base: int
    raw_bytes: int  # what the full model would have taken: the uncompressed side of the ratio


@dataclass(frozen=True)
class Step:
    """One downlink step: a worker holding `base` applies `payload` (a uint8 tensor) and holds `version`."""

    base: int
    version: int
    payload: torch.Tensor

    def to_state(self) -> dict[str, Any]:
        return {"base": self.base, "version": self.version, "payload": self.payload}


@dataclass(frozen=True)
class Pending:
    version: int
    held: Params
    step: Step | None
    full: Encoded  # `held` ready to stream (without compression its frames are built once for every worker)


def steps_from_state(state: Any, version: int) -> list[Step]:
    """Checkpointed steps, if they form one chain that ends at `version`; else none (workers behind then get
    the full model once: the steps only save bytes)."""
    if not state:
        return []
    try:
        steps = [Step(int(s["base"]), int(s["version"]), s["payload"]) for s in state]
        ok = all(isinstance(s.payload, torch.Tensor) and s.payload.dtype == torch.uint8 and s.payload.dim() == 1
                 for s in steps)
        ok = ok and all(a.version == b.base for a, b in itertools.pairwise(steps))
        ok = ok and steps[-1].version == version
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        log.warning("checkpointed downlink steps do not lead to the current version: dropped")
        return []
    return steps


class Downlink:
    def __init__(self, spec: DownlinkCompressionSpec, held: Params, version: int, chunk_bytes: int,
                 steps: Sequence[Step] = ()) -> None:
        self.scheme = comp.Scheme(bits=spec.bits, chunk=spec.chunk) if spec.enabled else None
        self.chunk_bytes = chunk_bytes
        self.held = held
        self.version = version
        self.full = encode(held, chunk_bytes)
        if self.scheme is None:
            self.full = self.full.prebuilt()
        self.steps: deque[Step] = deque(steps if self.scheme is not None else (), maxlen=spec.history)
        self._chains: dict[int, Encoded | None] = {}  # base version -> its steps to `version`, built when asked

    def prepare(self, params: Params, version: int) -> Pending:
        """The step to the global model `params` as `version` (to checkpoint before `commit`)."""
        if self.scheme is None:
            return Pending(version, params, None, encode(params, self.chunk_bytes).prebuilt())
        step = comp.downlink_step(self.held, params, self.scheme, np.random.default_rng(version))
        payload = torch.from_numpy(np.frombuffer(step.payload, dtype=np.uint8).copy())
        # the full model goes only to a new or lagging worker: its frames are built when sent
        return Pending(version, step.held, Step(self.version, version, payload), encode(step.held, self.chunk_bytes))

    def state_after(self, pending: Pending) -> tuple[Params | None, list[dict[str, Any]]]:
        """What the checkpoint keeps of the downlink once `pending` is committed: the held model and steps."""
        if pending.step is None:
            return None, []
        kept = [*self.steps, pending.step][-(self.steps.maxlen or 1):]
        return pending.held, [s.to_state() for s in kept]

    def commit(self, pending: Pending) -> None:
        if pending.step is not None:
            self.steps.append(pending.step)
        else:
            self.steps.clear()
        self.held, self.version = pending.held, pending.version
        self.full = pending.full
        self._chains = {}

    def offer(self, have_version: int) -> Offer:
        raw = self.full.total_bytes
        if have_version == self.version:
            return Offer(None, False, 0, 0)
        chain = self._chain(have_version)
        if chain is not None:
            return Offer(chain, True, have_version, raw)
        return Offer(self.full, False, 0, raw)

    def _chain(self, base: int) -> Encoded | None:
        """The steps from `base` to the current version as one download, None when `base` is not among the
        kept steps or the steps are not smaller than the full model. Built once per base and version."""
        if base in self._chains:
            return self._chains[base]
        starts = [i for i, s in enumerate(self.steps) if s.base == base]
        if not starts:  # not cached: any version a worker names would be kept otherwise
            return None
        chain: Encoded | None = None
        payloads = [s.payload for s in list(self.steps)[starts[-1]:]]
        if sum(p.numel() for p in payloads) < self.full.total_bytes:
            chain = encode(comp.chain_tensors(payloads), self.chunk_bytes).prebuilt()  # sent to many workers
        self._chains[base] = chain
        return chain
