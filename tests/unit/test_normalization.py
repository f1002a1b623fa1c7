from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from federator.api.models import DataSpec, FederationSpec
from federator.runtime.checkpoint import load_checkpoint, save_checkpoint
from federator.runtime.data import ArrayDataset, DataError, load_dataset, prepare_data
from federator.runtime.diagnostics import majority_rate, stuck_at_majority, stuck_message
from federator.runtime.normalization import (
    Normalizer,
    combine_stats,
    feature_stats,
    normalizer_from_proto,
    normalizer_from_stats,
    normalizer_to_proto,
    resolve_mode,
    stats_from_proto,
    stats_to_proto,
)
from federator.runtime.proto import federator_pb2 as pb
from tests.helpers.tables import raw_scale_table


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    rows = [",".join([*(repr(float(v)) for v in row), str(int(c))]) for row, c in zip(x, y, strict=True)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize("fmt", ["npz", "csv"])
def test_pooled_client_statistics_equal_the_pooled_data(tmp_path: Path, fmt: str) -> None:
    x, y = raw_scale_table(samples=300)
    path = tmp_path / f"table.{fmt}"
    if fmt == "npz":
        np.savez(path, x=x, y=y)
    else:
        _write_csv(path, x, y)
    spec = FederationSpec.model_validate({"rounds": 1, "data": {"dataset": fmt, "path": str(path),
                                                   "partition": {"scheme": "dirichlet", "alpha": 0.3}},
                                          "clients": {"count": 7}})
    assert resolve_mode(spec.data) == "standard"
    data = prepare_data(spec)
    np.testing.assert_allclose(load_dataset(spec.data).x, x, rtol=1e-6)  # the loader kept every value
    pooled = combine_stats(feature_stats(data.client(i).x) for i in range(data.num_clients))
    whole = feature_stats(data.train.x)
    assert pooled.count == whole.count == len(data.train)
    for name in ("sum", "sum_squares"):
        np.testing.assert_allclose(getattr(pooled, name), getattr(whole, name), rtol=1e-12)
    np.testing.assert_array_equal(pooled.min, whole.min)
    np.testing.assert_array_equal(pooled.max, whole.max)

    standard = normalizer_from_stats("standard", pooled)
    ref = StandardScaler().fit(data.train.x.astype(np.float64))
    assert standard is not None
    np.testing.assert_allclose(standard.shift, ref.mean_, rtol=1e-6)
    np.testing.assert_allclose(standard.scale, ref.scale_, rtol=1e-5)
    z = standard.apply(data.train).x
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-3)

    minmax = normalizer_from_stats("minmax", pooled)
    mm = MinMaxScaler().fit(data.train.x.astype(np.float64))
    assert minmax is not None
    np.testing.assert_allclose(minmax.shift, mm.data_min_, rtol=1e-6)
    np.testing.assert_allclose(minmax.scale, mm.data_range_, rtol=1e-6)
    assert normalizer_from_stats("none", pooled) is None


def test_defaults_and_explicit_modes() -> None:
    assert resolve_mode(DataSpec(dataset="digits")) == "none"
    assert resolve_mode(DataSpec(dataset="synthetic")) == "none"
    assert resolve_mode(DataSpec(dataset="csv", path="t.csv")) == "standard"
    assert resolve_mode(DataSpec(dataset="npz", path="t.npz", normalize="none")) == "none"
    assert resolve_mode(DataSpec(dataset="digits", normalize="minmax")) == "minmax"
    with pytest.raises(ValueError, match="normalize"):
        DataSpec.model_validate({"normalize": "zscore"})


def test_a_constant_feature_keeps_scale_one() -> None:
    x = np.array([[5.0, 1.0], [5.0, 3.0], [5.0, 5.0]], dtype=np.float32)
    nz = normalizer_from_stats("standard", feature_stats(x))
    assert nz is not None and nz.scale[0] == 1.0
    out = nz.apply(ArrayDataset(x, np.zeros(3, dtype=np.int64), 1)).x
    assert np.all(np.isfinite(out)) and np.all(out[:, 0] == 0.0)
    mm = normalizer_from_stats("minmax", feature_stats(x))
    assert mm is not None and mm.scale[0] == 1.0


def test_statistics_and_normaliser_survive_the_wire_and_the_checkpoint(tmp_path: Path) -> None:
    x = raw_scale_table(samples=50, features=6)[0].reshape(50, 2, 3)  # features of any shape
    s = feature_stats(x)
    back = stats_from_proto(pb.FeatureStats.FromString(stats_to_proto(s).SerializeToString()))
    assert back.count == 50 and back.shape == (2, 3)
    np.testing.assert_array_equal(back.sum_squares, s.sum_squares)
    nz = normalizer_from_stats("standard", s)
    assert nz is not None
    wire = normalizer_from_proto(pb.Normalization.FromString(normalizer_to_proto(nz).SerializeToString()))
    assert wire.same_as(nz)
    save_checkpoint(tmp_path / "c.pt", {"normalization": nz.to_state()})
    state = load_checkpoint(tmp_path / "c.pt")
    assert state is not None and Normalizer.from_state(state["normalization"]).same_as(nz)


def test_malformed_statistics_and_mismatched_features_are_refused() -> None:
    good = stats_to_proto(feature_stats(np.ones((4, 3), dtype=np.float32)))
    short = pb.FeatureStats(count=4, shape=[3], sum=[1.0, 2.0], sum_squares=[1, 1, 1], min=[0, 0, 0], max=[1, 1, 1])
    with pytest.raises(DataError, match="shape"):
        stats_from_proto(short)
    bad = pb.FeatureStats()
    bad.CopyFrom(good)
    bad.sum[0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        stats_from_proto(bad)
    with pytest.raises(DataError, match="do not match"):
        combine_stats([feature_stats(np.ones((2, 3))), feature_stats(np.ones((2, 4)))])
    nz = normalizer_from_stats("standard", stats_from_proto(good))
    assert nz is not None
    with pytest.raises(DataError, match="same features"):
        nz.apply(ArrayDataset(np.ones((2, 4), dtype=np.float32), np.zeros(2, dtype=np.int64), 1))


def test_majority_class_warning() -> None:
    y = np.array([0, 0, 0, 1, 2])
    assert majority_rate(y, 3) == pytest.approx(0.6)
    assert not stuck_at_majority([0.6, 0.6], 0.6)  # too early to tell
    assert stuck_at_majority([0.3, 0.6, 0.605, 0.6], 0.6)
    assert not stuck_at_majority([0.6, 0.6, 0.7], 0.6)
    assert "data.normalize: standard" in stuck_message(3, 0.6, "none")
    assert "data.normalize" not in stuck_message(3, 0.6, "standard")
