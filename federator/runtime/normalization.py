"""Feature normalisation computed the federated way (``data.normalize``).

Each client reduces its own training features to per-feature sufficient statistics (count, sum, sum of
squares, min, max); the server adds them up before round 1 and derives one shift and scale that every
client and the central evaluation apply identically. No feature row leaves a client: a silo sends only
its :class:`FeatureStats` with its join request.

Statistics are accumulated in float64: the pooled mean and variance equal those of the pooled data up to
rounding, whatever the split.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from federator.api.models import DataSpec
from federator.runtime.data import ArrayDataset, DataError
from federator.runtime.proto import federator_pb2 as pb

MODES = ("standard", "minmax", "none")
DEFAULT_STANDARD = ("npz", "csv")  # user-supplied features: raw scales; the built-in sets are pre-scaled


def resolve_mode(data: DataSpec) -> str:
    """``data.normalize``, or its default: standard for npz and csv features, none for the rest."""
    if data.normalize is not None:
        return data.normalize
    return "standard" if data.dataset in DEFAULT_STANDARD else "none"


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Per-feature sufficient statistics of one client's training features (arrays of the input shape)."""

    count: int
    sum: np.ndarray
    sum_squares: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.sum.shape)


def feature_stats(x: np.ndarray) -> FeatureStats:
    """The statistics of features ``x`` of shape (N, ...), over the first axis."""
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"data.normalize: need features of shape (N, ...) with N >= 1, got {x.shape}")
    x64 = np.asarray(x, dtype=np.float64)
    return FeatureStats(int(x.shape[0]), x64.sum(axis=0), np.square(x64).sum(axis=0), x64.min(axis=0),
                        x64.max(axis=0))


def combine_stats(parts: Iterable[FeatureStats]) -> FeatureStats:
    """The statistics of the union of the clients' data, from theirs alone."""
    items = list(parts)
    if not items:
        raise DataError("data.normalize: no client statistics to combine")
    shape = items[0].shape
    for s in items[1:]:
        if s.shape != shape:
            raise DataError(f"data.normalize: client statistics of shape {s.shape} do not match {shape}")
    return FeatureStats(
        sum(s.count for s in items),
        np.sum([s.sum for s in items], axis=0),
        np.sum([s.sum_squares for s in items], axis=0),
        np.min([s.min for s in items], axis=0),
        np.max([s.max for s in items], axis=0),
    )


@dataclass(frozen=True, eq=False)
class Normalizer:
    """``(x - shift) / scale``, per feature, in float32; the same arrays on the server and every client."""

    mode: str
    shift: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "shift", np.ascontiguousarray(self.shift, dtype=np.float32))
        object.__setattr__(self, "scale", np.ascontiguousarray(self.scale, dtype=np.float32))
        if self.shift.shape != self.scale.shape:
            raise DataError(f"normalisation shift {self.shift.shape} and scale {self.scale.shape} differ")
        if not (np.all(np.isfinite(self.shift)) and np.all(np.isfinite(self.scale)) and np.all(self.scale > 0)):
            raise DataError("normalisation: shift must be finite and scale finite and positive")

    def same_as(self, other: Normalizer | None) -> bool:
        return (other is not None and self.mode == other.mode and np.array_equal(self.shift, other.shift)
                and np.array_equal(self.scale, other.scale))

    def apply(self, ds: ArrayDataset) -> ArrayDataset:
        if ds.input_shape != self.shift.shape:
            raise DataError(
                f"data: features of shape {ds.input_shape} do not match the federation's normalisation "
                f"{self.shift.shape}; every client needs the same features"
            )
        return ArrayDataset((ds.x - self.shift) / self.scale, ds.y, ds.num_classes)

    def to_state(self) -> dict[str, Any]:
        """For the checkpoint (tensors and strings only)."""
        return {"mode": self.mode, "shift": torch.from_numpy(self.shift.copy()),
                "scale": torch.from_numpy(self.scale.copy())}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Normalizer:
        return cls(str(state["mode"]), state["shift"].numpy(), state["scale"].numpy())


def normalizer_from_stats(mode: str, stats: FeatureStats) -> Normalizer | None:
    """The normaliser for ``mode`` (None for ``none``); a constant feature keeps scale 1."""
    if mode == "none":
        return None
    if stats.count < 1:
        raise DataError("data.normalize: statistics of zero samples")
    if mode == "standard":
        mean = stats.sum / stats.count
        var = np.maximum(stats.sum_squares / stats.count - np.square(mean), 0.0)
        std = np.sqrt(var)
        return Normalizer(mode, mean, np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0))
    if mode == "minmax":
        span = stats.max - stats.min
        return Normalizer(mode, stats.min, np.where(span > 0, span, 1.0))
    raise DataError(f"data.normalize: {mode!r} is not one of {', '.join(MODES)}")


# ------------------------------------------------------------------------------------------- wire


def stats_to_proto(s: FeatureStats) -> pb.FeatureStats:
    return pb.FeatureStats(count=s.count, shape=list(s.shape), sum=s.sum.ravel().tolist(),
                           sum_squares=s.sum_squares.ravel().tolist(), min=s.min.ravel().tolist(),
                           max=s.max.ravel().tolist())


def stats_from_proto(m: pb.FeatureStats) -> FeatureStats:
    """A client's statistics as sent; a malformed message raises DataError naming what is wrong."""
    shape = tuple(int(d) for d in m.shape)
    n = int(np.prod(shape)) if shape else 0
    fields = {"sum": m.sum, "sum_squares": m.sum_squares, "min": m.min, "max": m.max}
    if m.count < 1 or n < 1 or any(len(v) != n for v in fields.values()):
        raise DataError(f"feature statistics: count {m.count} and arrays of {n} values for shape {shape} expected")
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(shape) for k, v in fields.items()}
    if not all(np.all(np.isfinite(a)) for a in arrays.values()):
        raise DataError("feature statistics: NaN or infinite values")
    return FeatureStats(int(m.count), arrays["sum"], arrays["sum_squares"], arrays["min"], arrays["max"])


def normalizer_to_proto(nz: Normalizer) -> pb.Normalization:
    return pb.Normalization(mode=nz.mode, shape=list(nz.shift.shape), shift=nz.shift.ravel().tolist(),
                            scale=nz.scale.ravel().tolist())


def normalizer_from_proto(m: pb.Normalization) -> Normalizer:
    shape = tuple(int(d) for d in m.shape)
    return Normalizer(m.mode, np.asarray(m.shift, dtype=np.float32).reshape(shape),
                      np.asarray(m.scale, dtype=np.float32).reshape(shape))
