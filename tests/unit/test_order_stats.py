"""order_stats.middle_mean: both kernels (sorting network, transposed numpy sort) against a loop over numpy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from federator.runtime import order_stats
from federator.runtime.order_stats import _network_mean, _sorted_mean, middle_mean, network

PATHS = {"network": _network_mean, "sort": _sorted_mean, "public": middle_mean}


def ref_middle_mean(x: np.ndarray, k: int) -> np.ndarray:
    n, d = x.shape
    return np.array([math.fsum(sorted(float(v) for v in x[:, j])[k : n - k]) / (n - 2 * k) for j in range(d)])


def bad_rows(n: int) -> int:
    return max(1, n // 4)


def hostile(n: int, d: int, seed: int, huge: bool = True) -> torch.Tensor:
    """Ties (values rounded to 0.5), whole equal columns and, with ``huge``, ``bad_rows(n)`` rows of
    values of +-1e30 (a float32 sum that kept any of them would lose the honest values)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) * 2).round() / 2 + 0.25
    x[:, : d // 8] = 3.0  # every value equal
    if huge:
        bad = torch.randperm(n, generator=g)[: bad_rows(n)]
        x[bad] = torch.randn(len(bad), d, generator=g).sign() * 1e30
    return x


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10, 11, 16, 20, 33, 64, 100])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_k_matches_the_loop_reference(n: int, path: str) -> None:
    for k in range(0, (n + 1) // 2):
        x = hostile(n, 37, seed=n, huge=k >= bad_rows(n))  # the huge values are trimmed whatever their signs
        xn = x.double().numpy()
        got = PATHS[path](x, k)
        assert got.dtype == torch.float32 and got.shape == (37,)
        np.testing.assert_allclose(got.double().numpy(), ref_middle_mean(xn, k), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_many_tiles_and_threads_match(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(order_stats, "_NETWORK_BYTES", 1)  # 1024-column network tiles
    monkeypatch.setattr(order_stats, "_SORT_COLUMNS", 300)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, k in [(10, 2), (9, 4), (40, 10)]:
            x = hostile(n, 3 * 1024 + 5, seed=100 + n)
            want = ref_middle_mean(x.double().numpy(), k)
            np.testing.assert_allclose(PATHS[path](x, k).double().numpy(), want, rtol=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_float64_stays_float64_and_exact(path: str) -> None:
    x = hostile(12, 50, seed=3).double() + 1e-9 * torch.randn(12, 50, dtype=torch.float64)
    got = PATHS[path](x, 3)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref_middle_mean(x.numpy(), 3), rtol=1e-13, atol=1e-13)


def test_bfloat16_goes_through_float32() -> None:
    x = torch.randn(10, 20, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    got = middle_mean(x, 2)
    assert got.dtype == torch.bfloat16
    want = ref_middle_mean(x.float().numpy(), 2)
    np.testing.assert_allclose(got.float().numpy(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_input_unchanged_and_permutation_invariant(path: str) -> None:
    big = hostile(24, 90, seed=5)
    before = big.clone()
    x = big[2:, 5:85]  # a non-contiguous view into a larger buffer
    out = PATHS[path](x, 6)  # x holds at most 6 of the huge rows
    assert torch.equal(big, before)
    assert out.untyped_storage().data_ptr() != big.untyped_storage().data_ptr()
    perm = torch.randperm(22, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(PATHS[path](x[perm], 6), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", range(1, 13))
def test_network_separates_the_groups_for_every_input(n: int) -> None:
    """0-1 principle: a comparator network sorts (here: separates) every input iff every 0/1 input."""
    for k in range(0, (n + 1) // 2):
        comparators = network(n, k)
        assert all(0 <= a < b < n for a, b in comparators)
        for bits in itertools.product((0, 1), repeat=n):
            w = list(bits)
            for a, b in comparators:
                if w[a] > w[b]:
                    w[a], w[b] = w[b], w[a]
            want = sorted(bits)
            assert sorted(w[:k]) == want[:k] and sorted(w[k : n - k]) == want[k : n - k], (n, k, bits)


def test_pruning_removes_comparators_inside_a_group() -> None:
    # the full sort of 8 wires has 19 comparators; only the low/high split at 4 needs fewer
    assert len(network(8, 0)) == 0
    assert len(network(8, 3)) < 19


def test_bad_k_is_named() -> None:
    with pytest.raises(ValueError, match=r"0 <= 2k < n=4, got k=2"):
        middle_mean(torch.zeros(4, 3), 2)


@pytest.mark.parametrize("n", [10, 100])  # the network and the sort path
def test_input_that_requires_grad_is_read_like_any_other(n: int) -> None:
    x = hostile(n, 30, seed=7).requires_grad_()
    k = n // 4
    want = ref_middle_mean(x.detach().double().numpy(), k)
    np.testing.assert_allclose(middle_mean(x, k).double().numpy(), want, rtol=1e-6, atol=1e-6)
