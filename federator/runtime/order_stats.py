"""Per-coordinate order statistics of a stack of updates: the mean of each column's middle sorted values.

``middle_mean(x, k)`` is the mean of sorted positions ``k .. n-k-1`` of every column of ``x`` (n, d): the
trimmed mean drops ``k`` values at each end, the median is ``k = (n - 1) // 2``. Two exact kernels:

- small n: a sorting network (Batcher's odd-even merge sort, pruned to what separates the three groups
  "dropped low", "kept", "dropped high") run as whole-row ``torch.minimum`` / ``torch.maximum`` on column
  tiles that stay in cache: vectorised across coordinates, with no transpose and no per-coordinate call;
- otherwise: column tiles transposed so that each coordinate's n values are contiguous, sorted by numpy
  (AVX-512 / AVX2 sorting networks on rows of ~100 values, several times faster than torch.sort,
  torch.kthvalue or torch.topk there), and reduced by one matrix-vector product.

Both run on ``torch.get_num_threads()`` worker threads over tiles (numpy's sort and torch's kernels
release the GIL), outside OpenMP. Inputs are finite (the server rejects non-finite updates); the input is
never written to.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Columns per sorted tile: n * _SORT_COLUMNS float32 values (1.6 MiB at n = 100) while transposed and sorted.
_SORT_COLUMNS = 4096
# Scratch per network tile (n + 1 rows of W floats): in L3; measured faster than L2-sized tiles, whose
# rows are too short to amortise the cost of a torch call.
_NETWORK_BYTES = 4 << 20
# Use the network while it costs at most this many min/max passes per value (2 * comparators / n):
# measured crossover against the sort path on one thread (n = 32 to 40).
_NETWORK_OPS_PER_VALUE = 10.0
# Beyond this n no pruned network is that cheap; do not build one to find out.
_NETWORK_MAX_N = 64


def middle_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """(d,) mean of the sorted values at positions ``k .. n-k-1`` of each column of ``x`` (n, d)."""
    x = x.detach()
    n, _ = x.shape
    if not 0 <= 2 * k < n:
        raise ValueError(f"k must satisfy 0 <= 2k < n={n}, got k={k}")
    if x.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16; half is slow there
        return middle_mean(x.float(), k).to(x.dtype)
    if n <= _NETWORK_MAX_N and network_ops_per_value(n, k) <= _NETWORK_OPS_PER_VALUE:
        return _network_mean(x, k)
    return _sorted_mean(x, k)


def _tiles(d: int, width: int) -> list[slice]:
    return [slice(start, min(start + width, d)) for start in range(0, d, width)]


def _run_tiles(d: int, width: int, work: Callable[[slice], None]) -> None:
    tiles = _tiles(d, width)
    threads = min(torch.get_num_threads(), len(tiles))
    if threads <= 1:
        for cols in tiles:
            work(cols)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, tiles))


# --- sort path --------------------------------------------------------------------------------------------


def _sorted_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    n, d = x.shape
    keep = n - 2 * k
    xn = x.detach().cpu().numpy()
    out = torch.empty(d, dtype=x.dtype)
    weights = torch.zeros(n, dtype=x.dtype)
    weights[k : n - k] = 1.0 / keep

    def work(cols: slice) -> None:
        block = np.ascontiguousarray(xn[:, cols].T)  # (c, n): each coordinate's n values contiguous
        block.sort(axis=1)
        torch.mv(torch.from_numpy(block), weights, out=out[cols])

    _run_tiles(d, _SORT_COLUMNS, work)
    return out.to(x.device)


# --- network path -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def network(n: int, k: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j (min to i, max to j) that put each column's sorted positions ``< k``,
    ``k .. n-k-1`` and ``>= n-k`` into those wires as three groups (in no order within a group).

    Batcher's odd-even merge sort on the next power of two, without the comparators that touch the
    padding (it would hold +inf, which never moves), and without the comparators at the end whose two
    wires already lead into the same group.
    """
    size = 1 << max(0, (n - 1).bit_length())
    comparators: list[tuple[int, int]] = []
    p = 1
    while p < size:
        q = p
        while q >= 1:
            for j in range(q % p, size - q, 2 * q):
                for i in range(min(q, size - j - q)):
                    a, b = i + j, i + j + q
                    if a // (2 * p) == b // (2 * p) and b < n:
                        comparators.append((a, b))
            q //= 2
        p *= 2
    group: list[int | None] = [0 if w < k else 1 if w < n - k else 2 for w in range(n)]
    kept: list[tuple[int, int]] = []
    for a, b in reversed(comparators):
        if group[a] is not None and group[a] == group[b]:
            continue  # both outputs land in the same group: the order between them does not matter
        kept.append((a, b))
        group[a] = group[b] = None  # before this comparator a value on a or b may end in either group
    return tuple(reversed(kept))


def _network_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    n, d = x.shape
    keep = n - 2 * k
    comparators = network(n, k)
    width = max(1024, _NETWORK_BYTES // ((n + 1) * x.element_size()))
    out = torch.empty(d, dtype=x.dtype, device=x.device)

    def work(cols: slice) -> None:
        c = cols.stop - cols.start
        scratch = torch.empty(n + 1, c, dtype=x.dtype, device=x.device)
        wires = [x[i, cols] for i in range(n)]  # views into x until a comparator writes to scratch
        owned = [False] * n
        free = [scratch[i] for i in range(n + 1)]
        for a, b in comparators:
            low = free.pop()
            torch.minimum(wires[a], wires[b], out=low)
            if owned[b]:
                torch.maximum(wires[a], wires[b], out=wires[b])
            else:
                high = free.pop()
                torch.maximum(wires[a], wires[b], out=high)
                wires[b], owned[b] = high, True
            if owned[a]:
                free.append(wires[a])
            wires[a], owned[a] = low, True
        total = out[cols]
        if keep == 1:
            total.copy_(wires[k])
            return
        torch.add(wires[k], wires[k + 1], out=total)
        for w in wires[k + 2 : n - k]:
            total.add_(w)
        total.div_(keep)

    _run_tiles(d, width, work)
    return out


def network_ops_per_value(n: int, k: int) -> float:
    """min/max passes per value of the network path (for the docs and the choice between the paths)."""
    return 2 * len(network(n, k)) / n if n > 0 else math.inf
