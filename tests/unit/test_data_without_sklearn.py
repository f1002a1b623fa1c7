"""The run time reads the digits and splits data without scikit-learn, with scikit-learn's exact results."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from federator.api.models import DataSpec
from federator.runtime.data import ArrayDataset, load_dataset, split_train_test


def test_digits_are_the_arrays_scikit_learn_loads() -> None:
    ds = load_dataset(DataSpec(dataset="digits"))
    bunch = load_digits()
    np.testing.assert_array_equal(ds.x, np.asarray(bunch.images, dtype=np.float32)[:, None] / np.float32(16.0))
    np.testing.assert_array_equal(ds.y, bunch.target)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64 and ds.num_classes == 10


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
@pytest.mark.parametrize(("labels", "fraction"), [
    (np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]), 0.2),  # digits' counts
    (np.array([0] * 7 + [1] * 3 + [2] * 5), 0.3),  # ties in the remainders
    (np.array([0] * 9 + [1] * 1), 0.2),  # a class of one: not stratified
])
def test_the_split_is_scikit_learns(labels: np.ndarray, fraction: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.permutation(labels).astype(np.int64)
    ds = ArrayDataset(np.arange(len(y), dtype=np.float32)[:, None], y, int(y.max()) + 1)
    train, test = split_train_test(ds, fraction, seed)
    n_test = min(max(1, round(len(y) * fraction)), len(y) - 1)
    stratify = y if np.bincount(y).min() >= 2 else None
    want_train, want_test = train_test_split(np.arange(len(y)), test_size=n_test, random_state=seed,
                                             stratify=stratify)
    np.testing.assert_array_equal(train.x[:, 0].astype(int), want_train)
    np.testing.assert_array_equal(test.x[:, 0].astype(int), want_test)


def test_a_server_and_a_worker_never_import_scikit_learn_kopf_or_matplotlib() -> None:
    code = ("import sys; import federator.runtime.server, federator.runtime.client;"
            "from federator.api.models import FederationSpec; from federator.runtime.data import prepare_data;"
            "prepare_data(FederationSpec(rounds=1));"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'kopf', 'kubernetes', 'matplotlib',"
            " 'scipy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
