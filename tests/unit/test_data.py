from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from federator.api.models import DataSpec, FederationSpec, PartitionSpec
from federator.runtime.data import (
    ArrayDataset,
    DataError,
    FederatedData,
    label_entropy,
    load_dataset,
    load_silo_data,
    partition_indices,
    prepare_data,
    split_train_test,
)


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    assert all(len(p) >= 1 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


# -------------------------------------------------------------------------------------- built-ins


def test_digits_shape_and_range() -> None:
    ds = load_dataset(DataSpec(dataset="digits"))
    assert ds.input_shape == (1, 8, 8)
    assert len(ds) == 1797
    assert ds.num_classes == 10
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert set(np.unique(ds.y)) == set(range(10))


def test_synthetic_is_deterministic_and_learnable() -> None:
    spec = DataSpec.model_validate({"dataset": "synthetic", "synthetic": {"samples": 600, "features": 12,
                                                                          "classes": 3}, "seed": 7})
    a, b = load_dataset(spec), load_dataset(spec)
    assert a.input_shape == (12,) and len(a) == 600 and a.num_classes == 3
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    c = load_dataset(spec.model_copy(update={"seed": 8}))
    assert not np.array_equal(a.x, c.x)
    assert np.bincount(a.y).tolist() == [200, 200, 200]
    from sklearn.linear_model import LogisticRegression

    train, test = split_train_test(a, 0.25, 0)
    clf = LogisticRegression(max_iter=500).fit(train.x, train.y)
    assert clf.score(test.x, test.y) > 0.8


# ------------------------------------------------------------------------------------------- npz


def test_npz_loader_accepts_key_variants_and_remaps_string_labels(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.float64).reshape(6, 4)
    p1 = tmp_path / "a.npz"
    np.savez(p1, x=x, y=np.array([0, 1, 2, 0, 1, 2]))
    ds = load_silo_data(str(p1), "npz")
    assert ds.input_shape == (4,) and ds.num_classes == 3
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))

    p2 = tmp_path / "b.npz"
    np.savez(p2, features=x, labels=np.array(["cat", "dog", "ant", "cat", "dog", "ant"]))
    ds2 = load_silo_data(str(p2), "npz")
    assert ds2.num_classes == 3
    assert ds2.y.tolist() == [1, 2, 0, 1, 2, 0]  # sorted: ant, cat, dog

    p3 = tmp_path / "c.npz"
    np.savez(p3, X=x, y=np.array([0, 1, 0, 1, 0, 1]))
    assert len(load_silo_data(str(p3), "npz")) == 6


def test_npz_keeps_integer_label_ids_and_scales_uint8_images(tmp_path: Path) -> None:
    p = tmp_path / "img.npz"
    imgs = np.full((4, 5, 5), 255, dtype=np.uint8)
    np.savez(p, x=imgs, y=np.array([0, 3, 3, 0]))
    ds = load_dataset(DataSpec(dataset="npz", path=str(p)))
    assert ds.input_shape == (1, 5, 5)
    assert float(ds.x.max()) == 1.0
    # a silo without classes 1 and 2 keeps label 3 meaning class 3
    assert ds.num_classes == 4 and ds.y.tolist() == [0, 3, 3, 0]


def test_npz_errors_name_the_field_and_keys(tmp_path: Path) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, inputs=np.zeros((3, 2)), targets=np.zeros(3))
    with pytest.raises(DataError, match=r"data\.path.*\['inputs', 'targets'\]"):
        load_silo_data(str(p), "npz")
    with pytest.raises(DataError, match=r"data\.path.*does not exist"):
        load_dataset(DataSpec(dataset="npz", path=str(tmp_path / "missing.npz")))
    p2 = tmp_path / "mismatch.npz"
    np.savez(p2, x=np.zeros((3, 2)), y=np.zeros(4))
    with pytest.raises(DataError, match="3 feature rows but 4 labels"):
        load_silo_data(str(p2), "npz")
    p3 = tmp_path / "junk.npz"
    p3.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"data\.path"):
        load_silo_data(str(p3), "npz")
    p4 = tmp_path / "nan.npz"
    np.savez(p4, x=np.array([[np.nan], [1.0]]), y=np.array([0, 1]))
    with pytest.raises(DataError, match="NaN"):
        load_silo_data(str(p4), "npz")


# ------------------------------------------------------------------------------------------- csv


def test_csv_loader(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("\ufefff1,species,f2\n1.0,b,2\n3,a,4.5\n\n5,b,6\n", encoding="utf-8")  # with a BOM
    ds = load_dataset(DataSpec(dataset="csv", path=str(p), labelColumn="species"))
    assert ds.input_shape == (2,)
    np.testing.assert_array_equal(ds.x, np.array([[1, 2], [3, 4.5], [5, 6]], dtype=np.float32))
    assert ds.y.tolist() == [1, 0, 1] and ds.num_classes == 2


def test_csv_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("label,a\n10,1\n9,2\n10,3\n")
    ds = load_silo_data(str(p), "csv")
    assert ds.num_classes == 11 and ds.y.tolist() == [10, 9, 10]


def test_csv_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("a,b,label\n1,2,x\n3,oops,y\n")
    with pytest.raises(DataError, match=r"line 3, column 'b': 'oops' is not a finite number"):
        load_silo_data(str(p), "csv")
    inf = tmp_path / "inf.csv"
    inf.write_text("a,label\n1,x\ninf,y\n")
    with pytest.raises(DataError, match=r"line 3, column 'a': 'inf' is not a finite number"):
        load_silo_data(str(inf), "csv")
    with pytest.raises(DataError, match=r"data\.labelColumn.*'target'.*\['a', 'b', 'label'\]"):
        load_silo_data(str(p), "csv", label_column="target")
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_silo_data(str(empty), "csv")
    header_only = tmp_path / "h.csv"
    header_only.write_text("a,label\n")
    with pytest.raises(DataError, match="no data rows"):
        load_silo_data(str(header_only), "csv")
    with pytest.raises(DataError, match=r"data\.format"):
        load_silo_data(str(p), "parquet")


# ------------------------------------------------------------------------------------ imagefolder


def _write_images(root: Path, classes: dict[str, int], color: bool = False) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = (10, 12, 3) if color else (10, 12)
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(arr).save(root / name / f"{i}.{ext}")


def test_imagefolder_grayscale_and_rgb(tmp_path: Path) -> None:
    _write_images(tmp_path / "g", {"zebra": 2, "ant": 3})
    (tmp_path / "g" / "ant" / "notes.txt").write_text("ignored")
    ds = load_dataset(DataSpec(dataset="imagefolder", path=str(tmp_path / "g"), imageSize=6))
    assert ds.x.shape == (5, 1, 6, 6)
    assert ds.num_classes == 2
    assert ds.y.tolist() == [0, 0, 0, 1, 1]  # classes sorted by name: ant, zebra
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0

    _write_images(tmp_path / "c", {"a": 1, "b": 1}, color=True)
    rgb = load_silo_data(str(tmp_path / "c"), "imagefolder", image_size=4, grayscale=False)
    assert rgb.x.shape == (2, 3, 4, 4)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        load_silo_data(str(tmp_path / "nope"), "imagefolder")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_silo_data(str(tmp_path / "flat"), "imagefolder")
    (tmp_path / "flat" / "a").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_silo_data(str(tmp_path / "flat"), "imagefolder")
    (tmp_path / "flat" / "a" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_silo_data(str(tmp_path / "flat"), "imagefolder")


# ---------------------------------------------------------------------------------------- split


def test_split_is_stratified_and_deterministic() -> None:
    ds = load_dataset(DataSpec(dataset="digits"))
    train, test = split_train_test(ds, 0.2, 3)
    assert len(train) + len(test) == len(ds)
    assert len(test) == round(0.2 * len(ds))
    share = np.bincount(test.y, minlength=10) / np.bincount(ds.y, minlength=10)
    assert np.all(np.abs(share - 0.2) < 0.02)
    train2, test2 = split_train_test(ds, 0.2, 3)
    assert np.array_equal(train.x, train2.x) and np.array_equal(test.y, test2.y)
    _, test3 = split_train_test(ds, 0.2, 4)
    assert not np.array_equal(test.x, test3.x)


def test_split_falls_back_when_a_class_is_a_singleton() -> None:
    ds = ArrayDataset(np.arange(10, dtype=np.float32).reshape(10, 1), np.array([0] * 9 + [1]), 2)
    train, test = split_train_test(ds, 0.3, 0)
    assert len(train) == 7 and len(test) == 3
    assert sorted(np.concatenate([train.x[:, 0], test.x[:, 0]]).tolist()) == list(range(10))


# ------------------------------------------------------------------------------------ partitions


@pytest.mark.parametrize(
    "spec",
    [PartitionSpec(scheme="iid"), PartitionSpec(scheme="dirichlet", alpha=0.1),
     PartitionSpec(scheme="dirichlet", alpha=100.0), PartitionSpec(scheme="shards", shardsPerClient=2)],
    ids=["iid", "dirichlet-0.1", "dirichlet-100", "shards"],
)
def test_partitions_disjoint_covering_deterministic(spec: PartitionSpec) -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=1000)
    labels_before = labels.copy()
    parts = partition_indices(labels, 20, spec, seed=5)
    assert len(parts) == 20
    _assert_disjoint_cover(parts, 1000)
    again = partition_indices(labels, 20, spec, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(labels, 20, spec, seed=6)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    assert np.array_equal(labels, labels_before)


def test_iid_partition_sizes_are_equal() -> None:
    parts = partition_indices(np.zeros(103, dtype=np.int64), 10, PartitionSpec(scheme="iid"), 0)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3


def _mean_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([label_entropy(labels[p], 10) for p in parts]))


def test_dirichlet_small_alpha_is_more_skewed_than_iid() -> None:
    labels = np.repeat(np.arange(10), 200)
    iid = partition_indices(labels, 10, PartitionSpec(scheme="iid"), 0)
    skewed = partition_indices(labels, 10, PartitionSpec(scheme="dirichlet", alpha=0.1), 0)
    mild = partition_indices(labels, 10, PartitionSpec(scheme="dirichlet", alpha=100.0), 0)
    e_iid, e_skew, e_mild = (_mean_entropy(labels, p) for p in (iid, skewed, mild))
    assert e_iid > 0.98 * np.log(10)
    assert e_skew < 0.6 * e_iid
    assert e_skew < e_mild
    assert all(len(p) >= 10 for p in skewed)  # every client gets a handful


def test_dirichlet_extreme_skew_still_gives_every_client_samples() -> None:
    labels = np.repeat(np.arange(2), 50)
    parts = partition_indices(labels, 40, PartitionSpec(scheme="dirichlet", alpha=0.001), 1)
    _assert_disjoint_cover(parts, 100)


def test_shards_limit_classes_per_client() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition_indices(labels, 10, PartitionSpec(scheme="shards", shardsPerClient=2), 0)
    _assert_disjoint_cover(parts, 1000)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_partition_errors() -> None:
    labels = np.zeros(5, dtype=np.int64)
    with pytest.raises(DataError, match=r"clients\.count \(6\) exceeds the 5 training samples"):
        partition_indices(labels, 6, PartitionSpec(), 0)
    with pytest.raises(DataError, match="shardsPerClient"):
        partition_indices(labels, 3, PartitionSpec(scheme="shards", shardsPerClient=2), 0)


# -------------------------------------------------------------------------------------- prepare


def test_prepare_data_is_deterministic_and_consistent() -> None:
    raw = {"rounds": 1, "clients": {"count": 8},
           "data": {"partition": {"scheme": "dirichlet", "alpha": 0.3}, "seed": 11}}
    fd = prepare_data(FederationSpec.model_validate(raw))
    assert isinstance(fd, FederatedData)
    assert fd.num_clients == 8 and fd.num_classes == 10 and fd.input_shape == (1, 8, 8)
    assert len(fd.train) + len(fd.test) == 1797
    _assert_disjoint_cover(fd.partitions, len(fd.train))
    c3 = fd.client(3)
    assert np.array_equal(c3.y, fd.train.y[fd.partitions[3]])
    with pytest.raises(IndexError):
        fd.client(8)
    # a fresh computation (as in another process) gives the same partitions
    from federator.runtime import data as data_mod

    data_mod._prepare_cached.cache_clear()
    fd2 = prepare_data(FederationSpec.model_validate(raw))
    assert fd2 is not fd
    assert all(np.array_equal(a, b) for a, b in zip(fd.partitions, fd2.partitions, strict=True))
    assert np.array_equal(fd.test.x, fd2.test.x)
    assert prepare_data(FederationSpec.model_validate(raw)) is fd2  # cached


def test_array_dataset_validates_and_subsets() -> None:
    ds = ArrayDataset(np.ones((4, 2)), np.array([0, 1, 1, 0]), 2)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    sub = ds.subset([1, 2])
    assert len(sub) == 2 and sub.num_classes == 2 and sub.y.tolist() == [1, 1]
    with pytest.raises(DataError):
        ArrayDataset(np.ones((4, 2)), np.array([0, 1, 2, 0]), 2)
    with pytest.raises(DataError):
        ArrayDataset(np.ones((4, 2)), np.array([0, 1]), 2)
