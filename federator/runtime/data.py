"""Data sets, train/test splits and client partitions for the federated runtime.

Everything here is deterministic for a seed: the server and every worker process call
:func:`prepare_data` independently and must agree on every client's partition without
talking to each other. Nothing is ever downloaded.
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from federator.api.models import DataSpec, FederationSpec, PartitionSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
NPZ_KEY_PAIRS = (("x", "y"), ("X", "y"), ("X", "Y"), ("features", "labels"))
FILE_FORMATS = ("npz", "csv", "imagefolder")
DIGITS_FILE = "digits.csv.gz"  # in scikit-learn's package data (sklearn/datasets/data)


class DataError(ValueError):
    """A data set that cannot be loaded or split; the message names the field to fix."""


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """An in-memory classification data set: ``x`` float32 of shape (N, ...), ``y`` int64 in 0..K-1."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        x = np.asarray(self.x, dtype=np.float32)
        y = np.asarray(self.y, dtype=np.int64)
        if x.ndim < 2:
            raise DataError(f"x must have shape (N, ...) with at least 2 dimensions, got {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"y must have shape ({x.shape[0]},) to match x, got {y.shape}")
        if self.num_classes < 1:
            raise DataError(f"num_classes must be >= 1, got {self.num_classes}")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            lo, hi = int(y.min()), int(y.max())
            raise DataError(f"labels must lie in 0..{self.num_classes - 1}, got {lo}..{hi}")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, indices: np.ndarray | Sequence[int]) -> ArrayDataset:
        """A copy holding only ``indices`` (same number of classes, so label ids keep their meaning)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes)


# ------------------------------------------------------------------------------------------- labels


def _encode_labels(raw: np.ndarray, field: str) -> tuple[np.ndarray, int]:
    """Map raw labels to int64 class ids.

    Non-negative integer labels are kept as they are (``num_classes = max + 1``), so that silos
    which lack a class still agree on what every id means. Anything else (strings, negative or
    fractional numbers) is mapped to 0..K-1 in sorted order.
    """
    raw = np.asarray(raw)
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1:
        raise DataError(f"{field}: labels must be one-dimensional, got shape {raw.shape}")
    if raw.size == 0:
        raise DataError(f"{field}: the data set is empty")
    if raw.dtype.kind in "biu" or (raw.dtype.kind == "f" and np.all(np.isfinite(raw))):
        as_int = raw.astype(np.int64)
        if np.array_equal(as_int, raw) and int(as_int.min()) >= 0:
            return as_int, int(as_int.max()) + 1
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        raise DataError(f"{field}: labels contain NaN or infinite values")
    classes, inverse = np.unique(raw, return_inverse=True)
    return inverse.astype(np.int64).reshape(-1), int(classes.shape[0])


def _check_features(x: np.ndarray, field: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{field}: features must be numeric, got dtype {x.dtype}")
    out = x.astype(np.float32)
    if x.dtype == np.uint8:  # uint8 arrays are images in 0..255: scale them like the image loader does
        out /= np.float32(255.0)
    if not np.all(np.isfinite(out)):
        raise DataError(f"{field}: features contain NaN or infinite values (or values too large for float32)")
    return out


# ------------------------------------------------------------------------------------------ loaders


def _load_digits() -> ArrayDataset:
    """scikit-learn's bundled digits (1,797 8x8 images), read from its package data file with numpy, as
    `sklearn.datasets.load_digits` reads it, without importing scikit-learn (most of a second per process)."""
    spec = importlib.util.find_spec("sklearn")  # a top-level name: found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.dataset 'digits' is scikit-learn's bundled data set: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / DIGITS_FILE
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")
    x = table[:, :-1].reshape(-1, 1, 8, 8).astype(np.float32) / np.float32(16.0)
    y = table[:, -1].astype(np.int64)
    return ArrayDataset(x, y, 10)


def _make_synthetic(samples: int, features: int, classes: int, seed: int) -> ArrayDataset:
    """Gaussian blobs: one random centre per class, unit noise, classes balanced.

    Learnable by a linear model when ``features`` is not tiny, but not perfectly separable.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(classes, features))
    y = rng.permutation(np.arange(samples, dtype=np.int64) % classes)
    x = centres[y] + rng.normal(0.0, 1.0, size=(samples, features))
    return ArrayDataset(x.astype(np.float32), y, classes)


def _as_image_batch(x: np.ndarray) -> np.ndarray:
    """(N,H,W) -> (N,1,H,W); channels-last (N,H,W,C) with C in 1,3,4 -> (N,C,H,W)."""
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4 and x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    return x


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _load_npz(path: str) -> ArrayDataset:
    p = _existing_file(path)
    try:
        with np.load(p, allow_pickle=False) as archive:
            keys = list(archive.files)
            pair = next(((xk, yk) for xk, yk in NPZ_KEY_PAIRS if xk in keys and yk in keys), None)
            if pair is None:
                wanted = ", ".join(f"{a}/{b}" for a, b in NPZ_KEY_PAIRS)
                raise DataError(
                    f"data.path: {p} has arrays {keys}; expected features and labels under one of the "
                    f"key pairs {wanted} (save it with np.savez(path, x=features, y=labels))"
                )
            raw_x = archive[pair[0]]
            raw_y = archive[pair[1]]
    except DataError:
        raise
    except ValueError as exc:  # object arrays need pickle, which we refuse; np.load also says so of non-zip files
        if not _is_zip(p):
            raise DataError(f"data.path: {p} is not an npz file (an npz is a zip of arrays: save it with "
                            "np.savez(path, x=features, y=labels)), or set data.dataset to its format") from exc
        raise DataError(
            f"data.path: cannot read {p} as npz without pickle ({exc}); store numeric arrays"
        ) from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"data.path: {p} is not a readable npz file ({exc})") from exc
    if raw_x.ndim < 2:
        raise DataError(f"data.path: {p} array {pair[0]!r} must have shape (N, ...), got {raw_x.shape}")
    if raw_x.shape[0] != raw_y.shape[0]:
        raise DataError(
            f"data.path: {p} has {raw_x.shape[0]} feature rows but {raw_y.shape[0]} labels; they must match"
        )
    x = _check_features(_as_image_batch(raw_x), f"data.path ({p}, array {pair[0]!r})")
    y, k = _encode_labels(raw_y, f"data.path ({p}, array {pair[1]!r})")
    return ArrayDataset(x, y, k)


def _load_csv(path: str, label_column: str) -> ArrayDataset:
    p = _existing_file(path)
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"data.path: {p} is empty; it needs a header row and data rows")
            header = [h.strip() for h in header]
            if label_column not in header:
                raise DataError(
                    f"data.labelColumn: column {label_column!r} is not in {p}; its columns are {header}"
                )
            label_pos = header.index(label_column)
            feature_cols = [i for i in range(len(header)) if i != label_pos]
            if not feature_cols:
                raise DataError(
                    f"data.path: {p} has only the label column {label_column!r}; add feature columns"
                )
            rows: list[list[float]] = []
            labels: list[str] = []
            for row in reader:
                line_no = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"data.path: {p} line {line_no} has {len(row)} values "
                        f"but the header has {len(header)}"
                    )
                values: list[float] = []
                for i in feature_cols:
                    try:
                        value = float(row[i])
                    except ValueError:
                        value = math.nan
                    if not math.isfinite(value):
                        raise DataError(
                            f"data.path: {p} line {line_no}, column {header[i]!r}: {row[i]!r} "
                            "is not a finite number; "
                            f"every column except data.labelColumn ({label_column!r}) must be numeric"
                        )
                    values.append(value)
                rows.append(values)
                labels.append(row[label_pos].strip())
    except UnicodeDecodeError as exc:
        raise DataError(f"data.path: {p} is not UTF-8 text ({exc})") from exc
    if not rows:
        raise DataError(f"data.path: {p} has a header but no data rows")
    x = _check_features(np.asarray(rows, dtype=np.float64), f"data.path ({p})")
    y, k = _encode_labels(_numeric_if_possible(labels), f"data.labelColumn ({label_column!r} in {p})")
    return ArrayDataset(x, y, k)


def _numeric_if_possible(labels: list[str]) -> np.ndarray:
    """CSV labels "0", "1", "10" become numbers (so 10 sorts after 9); otherwise they stay strings."""
    try:
        return np.asarray([float(v) for v in labels], dtype=np.float64)
    except ValueError:
        return np.asarray(labels)


def _load_imagefolder(path: str, image_size: int, grayscale: bool) -> ArrayDataset:
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataError(
            f"data.path: {root} is not a folder; imagefolder expects <path>/<class name>/<image>.png"
        )
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"data.path: {root} has no class sub-folders; put images in <path>/<class name>/")
    mode = "L" if grayscale else "RGB"
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, d in enumerate(class_dirs):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            try:
                with Image.open(f) as img:
                    arr = np.asarray(
                        img.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR),
                        dtype=np.float32,
                    )
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"data.path: cannot read image {f} ({exc}); remove or replace it") from exc
            images.append(arr[None, :, :] if grayscale else np.transpose(arr, (2, 0, 1)))
            labels.append(label)
    if not images:
        raise DataError(
            f"data.path: no images ({', '.join(IMAGE_SUFFIXES)}) found in the class folders of {root}"
        )
    x = np.stack(images) / np.float32(255.0)
    return ArrayDataset(x, np.asarray(labels, dtype=np.int64), len(class_dirs))


def _existing_file(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        where = "" if p.is_absolute() else f" (relative to {Path.cwd()})"
        raise DataError(f"data.path: {p} does not exist{where}; set data.path to an existing file")
    if not p.is_file():
        raise DataError(f"data.path: {p} is not a file")
    return p


def _load_file(path: str, fmt: str, label_column: str, image_size: int, grayscale: bool) -> ArrayDataset:
    if fmt == "npz":
        return _load_npz(path)
    if fmt == "csv":
        return _load_csv(path, label_column)
    if fmt == "imagefolder":
        return _load_imagefolder(path, image_size, grayscale)
    raise DataError(f"data.format: {fmt!r} is not supported; use one of {', '.join(FILE_FORMATS)}")


def load_dataset(spec: DataSpec) -> ArrayDataset:
    """Load the whole data set described by ``spec`` (before any train/test split)."""
    if spec.dataset == "digits":
        return _load_digits()
    if spec.dataset == "synthetic":
        s = spec.synthetic
        return _make_synthetic(s.samples, s.features, s.classes, spec.seed)
    if not spec.path:
        raise DataError(f"data.path: required when data.dataset is {spec.dataset!r}")
    return _load_file(spec.path, spec.dataset, spec.labelColumn, spec.imageSize, spec.grayscale)


def load_silo_data(
    path: str, fmt: str, label_column: str = "label", image_size: int = 28, grayscale: bool = True
) -> ArrayDataset:
    """A silo client's own data (``FederatedClient.spec.data``)."""
    return _load_file(path, fmt, label_column, image_size, grayscale)


# --------------------------------------------------------------------------------- split, partition


def split_train_test(ds: ArrayDataset, test_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Shuffle and hold out ``test_fraction``; stratified when every class has at least 2 samples.

    The same split as scikit-learn's ``train_test_split(..., random_state=seed, stratify=...)`` (a test
    checks it), without importing scikit-learn at run time.
    """
    n = len(ds)
    if n < 2:
        raise DataError(f"data: need at least 2 samples to split into train and test, got {n}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.testFraction must be between 0 and 1, got {test_fraction}")
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    counts = np.bincount(ds.y)
    present = counts[counts > 0]
    rng = np.random.RandomState(seed)
    if present.min() >= 2 and n_test >= len(present) and n - n_test >= len(present):
        train_idx, test_idx = _stratified_split(ds.y, n - n_test, n_test, rng)
    else:
        permutation = rng.permutation(n)
        train_idx, test_idx = permutation[n_test:], permutation[:n_test]
    return ds.subset(train_idx), ds.subset(test_idx)


def _stratified_split(y: np.ndarray, n_train: int, n_test: int,
                      rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's StratifiedShuffleSplit, one split: each class in proportion, ties broken by `rng`."""
    _, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(class_counts)):
        members = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(members[: n_i[i]])
        test.extend(members[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of `n_draws` each class gets: the floor of its share, then one more for the largest
    remainders (ties drawn at random), as scikit-learn's `_approximate_mode`."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def partition_indices(
    labels: np.ndarray, num_clients: int, spec: PartitionSpec, seed: int
) -> list[np.ndarray]:
    """Split sample indices among ``num_clients``: disjoint, covering, each non-empty, sorted."""
    labels = np.asarray(labels, dtype=np.int64)
    n = int(labels.shape[0])
    if num_clients < 1:
        raise DataError(f"clients.count must be >= 1, got {num_clients}")
    if num_clients > n:
        raise DataError(
            f"clients.count ({num_clients}) exceeds the {n} training samples; every client needs at least "
            "one: lower clients.count or use more data"
        )
    rng = np.random.default_rng(seed)
    if spec.scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif spec.scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, spec.alpha, rng)
    elif spec.scheme == "shards":
        parts = _shards(labels, num_clients, spec.shardsPerClient, rng)
    else:  # pragma: no cover - the API model restricts the scheme
        raise DataError(f"data.partition.scheme: unknown scheme {spec.scheme!r}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label skew after Hsu et al. 2019, as implemented in NIID-Bench (Li et al. 2022).

    For every class, proportions over clients ~ Dir(alpha); a client already holding its fair share
    (N / clients) gets no more of the next class. Re-drawn until every client has ``min_size``
    samples; if that keeps failing (tiny alpha, many clients), samples are moved from the largest
    clients to the smallest.
    """
    n = labels.shape[0]
    min_size = max(1, min(10, n // (2 * num_clients)))
    class_indices = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    clients = np.arange(num_clients)
    owner = np.empty(n, dtype=np.int64)
    sizes = np.zeros(num_clients, dtype=np.int64)
    for _attempt in range(30):
        sizes[:] = 0
        for idx in class_indices:
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * (sizes < n / num_clients)
            total = p.sum()
            p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = np.minimum((np.cumsum(p) * len(idx)).astype(np.int64)[:-1], len(idx))
            counts = np.diff(np.concatenate(([0], cuts, [len(idx)])))
            owner[idx] = np.repeat(clients, counts)
            sizes += counts
        if sizes.min() >= min_size:
            break
    else:
        _rebalance(owner, sizes, min_size, rng)
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(sizes)[:-1])


def _rebalance(owner: np.ndarray, sizes: np.ndarray, min_size: int, rng: np.random.Generator) -> None:
    """Move random samples from the largest clients to those below ``min_size`` (in place)."""
    for c in np.flatnonzero(sizes < min_size):
        while sizes[c] < min_size:
            donor = int(np.argmax(sizes))
            k = int(min(min_size - sizes[c], sizes[donor] - min_size))
            if k <= 0:
                return
            moved = rng.choice(np.flatnonzero(owner == donor), size=k, replace=False)
            owner[moved] = c
            sizes[donor] -= k
            sizes[c] += k


def _shards(
    labels: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into equal shards, deal ``per_client`` to each client."""
    n = labels.shape[0]
    num_shards = num_clients * per_client
    if num_shards > n:
        raise DataError(
            f"data.partition.shardsPerClient ({per_client}) x clients.count ({num_clients}) = {num_shards} "
            f"shards exceeds the {n} training samples: lower shardsPerClient or clients.count"
        )
    shuffled = rng.permutation(n)  # random order inside each class, then a stable sort by label
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards)
    return [
        np.concatenate([shards[s] for s in dealt[i * per_client : (i + 1) * per_client]])
        for i in range(num_clients)
    ]


# ----------------------------------------------------------------------------------- federated data


@dataclass(frozen=True, eq=False)
class FederatedData:
    """The held-out test set and the training set split among the simulated clients."""

    train: ArrayDataset
    test: ArrayDataset
    partitions: list[np.ndarray]

    @property
    def num_clients(self) -> int:
        return len(self.partitions)

    @property
    def num_classes(self) -> int:
        return max(self.train.num_classes, self.test.num_classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.input_shape

    def client(self, i: int) -> ArrayDataset:
        if not 0 <= i < self.num_clients:
            raise IndexError(f"client {i} out of range: there are {self.num_clients} clients")
        return self.train.subset(self.partitions[i])


def prepare_data(spec: FederationSpec) -> FederatedData:
    """Load, split and partition the federation's data; cached per process and deterministic.

    The result is shared between callers in the process: do not modify its arrays.
    """
    return _prepare_cached(spec.data.model_dump_json(), spec.clients.count)


@functools.lru_cache(maxsize=8)
def _prepare_cached(data_json: str, num_clients: int) -> FederatedData:
    data = DataSpec.model_validate_json(data_json)
    ds = load_dataset(data)
    train, test = split_train_test(ds, data.testFraction, data.seed)
    parts = partition_indices(train.y, num_clients, data.partition, data.seed)
    return FederatedData(train=train, test=test, partitions=parts)


def label_entropy(labels: np.ndarray, num_classes: int) -> float:
    """Shannon entropy (nats) of a label histogram; a quick measure of label skew."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())
