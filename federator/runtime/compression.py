"""Compressed model updates: top-k sparsification, stochastic quantisation, error feedback; pure functions.

An update is the difference between two models, flattened to one float32 vector over the floating tensors
in layout order (`flatten`). `compress` turns it into a compact payload:

* top-k keeps the `ratio` largest-magnitude entries; their indices travel as delta-encoded varints or a
  bitmap, whichever is smaller (both vectorised with numpy);
* quantisation to 8, 4 or 2 bits rounds stochastically (unbiased) to signed levels with one float32 scale
  per `chunk` values; 2 bits is ternary {-1, 0, 1} x scale; values are packed at their bit width;
* error feedback is the caller's: `residual = x - decompress(compress(x))` is added to the next update.

`decompress` checks everything before it returns a value: the magic and version, the bit width, counts
and lengths of every section, index bounds, strictly increasing indices, finite scales and values, and
a CRC-32C over the body. Any failure raises `Rejected` with a reason from `REASONS`.

Payload (little-endian): a 40-byte header (`_HEADER`), then the index section, the scales, the values.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from federator.runtime.transport import Layout, Rejected, TensorLayout, checksum

MAGIC = b"FZC1"
BITS = (2, 4, 8, 32)  # 32: float32 values, no quantisation
INDEX_DENSE, INDEX_VARINT, INDEX_BITMAP = 0, 1, 2
DEFAULT_CHUNK = 256
REASONS = ("malformed", "truncated", "unsupported_bits", "wrong_count", "index_out_of_range",
           "unsorted_indices", "checksum_mismatch", "non_finite")

# magic, bits, index kind, 2 pad, n, k, chunk, index bytes, crc32c of the body
_HEADER = struct.Struct("<4sBBxxQQIQI")
_MAX_VARINT = 10


@dataclass(frozen=True)
class Scheme:
    """What to do to an update: keep the top `ratio` entries (1.0: all), quantise to `bits`."""

    ratio: float = 1.0
    bits: int = 32
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if not 1 <= self.chunk <= 1 << 24:
            raise ValueError(f"chunk must be in 1..2^24, got {self.chunk}")

    @property
    def identity(self) -> bool:
        return self.ratio == 1.0 and self.bits == 32


# ------------------------------------------------------------------------------ flat vectors


def float_names(params: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors an update covers: the floating ones (others, e.g. BatchNorm's counters, stay the base's)."""
    return [k for k, t in params.items() if t.is_floating_point()]


def flatten(params: Mapping[str, torch.Tensor], names: list[str]) -> np.ndarray:
    """The named tensors as one float32 vector (a copy)."""
    if not names:
        return np.zeros(0, dtype=np.float32)
    return torch.cat([params[k].detach().reshape(-1).float() for k in names]).numpy()


def unflatten(flat: np.ndarray, like: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into tensors shaped (and typed) like `like`'s named tensors."""
    out, pos = {}, 0
    for k in names:
        t = like[k]
        n = t.numel()
        out[k] = torch.from_numpy(flat[pos : pos + n]).reshape(t.shape).to(t.dtype)
        pos += n
    if pos != flat.size:
        raise ValueError(f"flat vector has {flat.size} values, the tensors {pos}")
    return out


def model_delta(new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], names: list[str]) -> np.ndarray:
    """new - base over the named tensors, flat float32, in one pass (no concatenated copies)."""
    out = np.empty(sum(base[k].numel() for k in names), dtype=np.float32)
    pos = 0
    for k in names:
        a = new[k].detach().reshape(-1).float().numpy()
        b = base[k].detach().reshape(-1).float().numpy()
        np.subtract(a, b, out=out[pos : pos + a.size])
        pos += a.size
    return out


def apply_delta(base: Mapping[str, torch.Tensor], delta: np.ndarray, names: list[str]) -> dict[str, torch.Tensor]:
    """base + delta as a new state dict, one pass per tensor; tensors that are not named are the base's own."""
    out = dict(base)
    pos = 0
    for k in names:
        t = base[k]
        n = t.numel()
        if pos + n > delta.size:
            raise ValueError(f"delta has {delta.size} values, the tensors more")
        d = torch.from_numpy(delta[pos : pos + n]).reshape(t.shape)
        out[k] = (t.detach().float() + d).to(t.dtype)
        pos += n
    if pos != delta.size:
        raise ValueError(f"delta has {delta.size} values, the tensors {pos}")
    return out


# ------------------------------------------------------------------------------ varints and bitmaps


def encode_varints(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 varints of `values` (uint64), as uint8: one pass per byte position, not per value."""
    v = values.astype(np.uint64, copy=False)
    if v.size == 0:
        return np.zeros(0, dtype=np.uint8)
    lengths = np.ones(v.size, dtype=np.int64)
    for j in range(1, _MAX_VARINT):
        lengths += v >= np.uint64(1) << np.uint64(7 * j)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for j in range(int(lengths.max())):
        has = lengths > j
        byte = (v[has] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lengths[has] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + j] = (byte | more).astype(np.uint8)
    return out


def decode_varints(data: np.ndarray, count: int) -> np.ndarray:
    """`count` varints from `data` (uint8), as uint64; `Rejected` when the bytes do not hold exactly that."""
    ends = np.flatnonzero(data < 0x80)
    if ends.size != count:
        raise Rejected("wrong_count", f"index section holds {ends.size} varints, the header says {count}")
    if count and ends[-1] != data.size - 1:
        raise Rejected("truncated", "the index section ends inside a varint")
    if count == 0:
        if data.size:
            raise Rejected("malformed", "index bytes present for zero entries")
        return np.zeros(0, dtype=np.uint64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = lengths == _MAX_VARINT  # a 10th byte may carry only the 64th bit
    if lengths.max() > _MAX_VARINT or (data[ends[longest]] > 1).any():
        raise Rejected("malformed", "a varint longer than 64 bits")
    out = np.zeros(count, dtype=np.uint64)
    for j in range(int(lengths.max())):
        has = lengths > j
        out[has] |= (data[starts[has] + j].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * j)
    return out


def encode_indices(indices: np.ndarray, n: int) -> tuple[int, np.ndarray]:
    """Sorted unique indices as (kind, bytes): delta-encoded varints or a bitmap, whichever is smaller."""
    deltas = np.diff(indices.astype(np.int64), prepend=0)  # the first delta is the first index itself
    varints = encode_varints(deltas.astype(np.uint64))
    if varints.size <= (n + 7) // 8:
        return INDEX_VARINT, varints
    mask = np.zeros(n, dtype=bool)
    mask[indices] = True
    return INDEX_BITMAP, np.packbits(mask, bitorder="little")


def decode_indices(kind: int, data: np.ndarray, n: int, k: int) -> np.ndarray:
    """Indices (int64) of `k` entries of an `n`-vector; strictly increasing and in range, or `Rejected`."""
    if kind == INDEX_BITMAP:
        if data.size != (n + 7) // 8:
            raise Rejected("wrong_count", f"bitmap of {data.size} bytes for {n} entries")
        bits = np.unpackbits(data, bitorder="little")
        if bits[n:].any():
            raise Rejected("index_out_of_range", "bitmap marks entries past the vector's end")
        indices = np.flatnonzero(bits[:n])
        if indices.size != k:
            raise Rejected("wrong_count", f"bitmap marks {indices.size} entries, the header says {k}")
        return indices.astype(np.int64)
    if kind != INDEX_VARINT:
        raise Rejected("malformed", f"unknown index kind {kind}")
    deltas = decode_varints(data, k)
    if k and (deltas[1:] == 0).any():
        raise Rejected("unsorted_indices", "indices repeat (a zero delta)")
    if k and (deltas[1:] >= np.uint64(1 << 63)).any():
        raise Rejected("unsorted_indices", "indices decrease (a negative delta)")
    if k and (deltas > np.uint64(n)).any():
        raise Rejected("index_out_of_range", "an index delta past the vector's end")
    indices = np.cumsum(deltas.astype(np.int64))  # each delta <= n: no overflow
    if k and indices[-1] >= n:
        raise Rejected("index_out_of_range", f"index {int(indices[-1])} in a vector of {n}")
    return indices


# ------------------------------------------------------------------------------ quantisation


def levels(bits: int) -> int:
    """Largest quantised magnitude: values become integers in [-L, L]. 2 bits: ternary (L = 1)."""
    return (1 << (bits - 1)) - 1


def quantise(values: np.ndarray, bits: int, chunk: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic rounding to integers in [-L, L] with a scale per chunk; returns (q as uint8 offset by L,
    float32 scales). Unbiased: E[q * scale] = value; |q * scale - value| < scale = max|chunk| / L.
    Works in place on one scratch buffer: at 10M values each extra temporary costs more than the math."""
    lv = levels(bits)
    n = values.size
    nchunks = -(-n // chunk)
    work = np.zeros(nchunks * chunk, dtype=np.float32)
    work[:n] = values
    blocks = work.reshape(nchunks, chunk)
    scales = np.abs(blocks).max(axis=1)
    scales /= np.float32(lv)
    inverse = np.divide(np.float32(1.0), scales, out=np.zeros_like(scales), where=scales > 0)
    blocks *= inverse[:, None]
    blocks += rng.random(blocks.shape, dtype=np.float32)
    np.floor(work, out=work)
    np.clip(work, -lv, lv, out=work)
    work += np.float32(lv)
    return work[:n].astype(np.uint8), scales.astype(np.float32, copy=False)


def dequantise(q: np.ndarray, scales: np.ndarray, bits: int, chunk: int) -> np.ndarray:
    lv = levels(bits)
    out = np.full(scales.size * chunk, lv, dtype=np.float32)
    out[: q.size] = q
    out -= np.float32(lv)
    out.reshape(scales.size, chunk)[...] *= scales[:, None]
    return out[: q.size]


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values of `bits` bits each, packed little-endian within each byte."""
    if bits == 8:
        return q.astype(np.uint8)
    per = 8 // bits
    padded = np.zeros(-(-q.size // per) * per, dtype=np.uint8)
    padded[: q.size] = q
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return data[:count]
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return ((data[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)[:count]


def value_bytes(k: int, bits: int) -> int:
    return 4 * k if bits == 32 else -(-k * bits // 8)


def scale_count(k: int, bits: int, chunk: int) -> int:
    return 0 if bits == 32 else -(-k // chunk)


# ------------------------------------------------------------------------------ payloads


def top_k(x: np.ndarray, ratio: float) -> np.ndarray:
    """Sorted indices of the ceil(ratio * n) largest |x| (all of them when ratio is 1).

    Exact, and fast on large vectors: a threshold from a fixed sample keeps about 2k candidates in one
    comparison pass, and only those are partitioned. When the sample misjudged it (fewer than k
    candidates) the whole vector is partitioned instead."""
    n = x.size
    k = min(n, max(1, int(np.ceil(ratio * n)))) if n else 0
    if k == n:
        return np.arange(n, dtype=np.int64)
    mag = np.abs(x)
    if n >= 1 << 16 and 2 * k < n:
        sample = mag[np.random.default_rng(0).integers(0, n, 8192)]
        threshold = np.quantile(sample, 1.0 - 2.0 * k / n)
        candidates = np.flatnonzero(mag >= threshold)
        if candidates.size >= k:  # then the k-th largest is >= threshold: every top-k entry is a candidate
            keep = np.argpartition(mag[candidates], candidates.size - k)[candidates.size - k :]
            idx = candidates[keep]
            idx.sort()
            return idx.astype(np.int64)
    idx = np.argpartition(mag, n - k)[n - k :]
    idx.sort()
    return idx.astype(np.int64)


def compress(x: np.ndarray, scheme: Scheme, rng: np.random.Generator) -> bytes:
    """The payload of flat float32 update `x` under `scheme`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.size
    if scheme.ratio < 1.0:
        idx = top_k(x, scheme.ratio)
        kind, index_bytes = encode_indices(idx, n)
        values = x[idx]
    else:
        kind, index_bytes, values = INDEX_DENSE, np.zeros(0, dtype=np.uint8), x
    k = values.size
    if scheme.bits == 32:
        body_parts = [index_bytes.tobytes(), values.astype("<f4").tobytes()]
    else:
        q, scales = quantise(values, scheme.bits, scheme.chunk, rng)
        body_parts = [index_bytes.tobytes(), scales.astype("<f4").tobytes(), pack_bits(q, scheme.bits).tobytes()]
    body = b"".join(body_parts)
    header = _HEADER.pack(MAGIC, scheme.bits, kind, n, k, scheme.chunk, index_bytes.size, checksum(body))
    return header + body


@dataclass(frozen=True)
class PayloadInfo:
    n: int
    k: int
    bits: int
    index_kind: int
    nbytes: int


def payload_info(payload: bytes | memoryview) -> PayloadInfo:
    """The header's claims, checked for shape only (`decompress` checks the rest)."""
    if len(payload) < _HEADER.size:
        raise Rejected("truncated", f"{len(payload)} bytes, a compressed update's header alone is {_HEADER.size}")
    magic, bits, kind, n, k, _chunk, _ib, _crc = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise Rejected("malformed", "not a compressed update (bad magic)")
    return PayloadInfo(n, k, bits, kind, len(payload))


def decompress(payload: bytes | memoryview, n_expected: int) -> np.ndarray:
    """The dense float32 update of length `n_expected` in `payload`, after checking every part of it."""
    info = payload_info(payload)
    _magic, bits, kind, n, k, chunk, index_nbytes, crc = _HEADER.unpack_from(payload)
    if bits not in BITS:
        raise Rejected("unsupported_bits", f"bit width {bits}; the format has {BITS}")
    if n != n_expected:
        raise Rejected("wrong_count", f"update of {n} values, the model has {n_expected}")
    if k > n or (kind == INDEX_DENSE and k != n):
        raise Rejected("wrong_count", f"{k} values for a vector of {n}")
    if kind == INDEX_DENSE and index_nbytes:
        raise Rejected("malformed", "a dense update with an index section")
    if bits != 32 and not 1 <= chunk <= 1 << 24:
        raise Rejected("malformed", f"quantisation chunk {chunk}")
    n_scales = scale_count(k, bits, chunk)
    want = _HEADER.size + index_nbytes + 4 * n_scales + value_bytes(k, bits)
    if info.nbytes < want:
        raise Rejected("truncated", f"{info.nbytes} bytes, the header describes {want}")
    if info.nbytes > want:
        raise Rejected("wrong_count", f"{info.nbytes} bytes, the header describes {want}")
    body = memoryview(payload)[_HEADER.size :]
    if checksum(body) != crc:
        raise Rejected("checksum_mismatch", "compressed update's CRC-32C differs from its header")
    raw = np.frombuffer(body, dtype=np.uint8)
    pos = index_nbytes
    idx = decode_indices(kind, raw[:pos], n, k) if kind != INDEX_DENSE else None
    if bits == 32:
        values = raw[pos:].view("<f4").astype(np.float32)
    else:
        scales = raw[pos : pos + 4 * n_scales].view("<f4").astype(np.float32)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise Rejected("non_finite", "a quantisation scale is negative, NaN or Inf")
        q = unpack_bits(raw[pos + 4 * n_scales :], bits, k)
        if (q > 2 * levels(bits)).any():
            raise Rejected("malformed", f"a quantised value outside the {bits}-bit levels")
        values = dequantise(q, scales, bits, chunk)
    if not np.isfinite(values).all():
        raise Rejected("non_finite", "the update contains NaN or Inf")
    if idx is None:
        return values
    dense = np.zeros(n, dtype=np.float32)
    dense[idx] = values
    return dense


@dataclass
class ErrorFeedback:
    """What compression left out, added to the next update (Seide et al. 2014; Karimireddy et al. 2019)."""

    residual: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> ErrorFeedback:
        return cls(np.zeros(n, dtype=np.float32))

    def step(self, update: np.ndarray, scheme: Scheme, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
        """Compress update + residual; returns the payload and the residual to keep if the server takes it
        (the caller commits it only then: a rejected update was not applied, so its residual is void)."""
        target = update + self.residual
        payload = compress(target, scheme, rng)
        return payload, target - decompress(payload, target.size)


# ------------------------------------------------------------------------------ model updates both ways

COMPRESSED = "compressed"  # the name of the one uint8 tensor that carries a payload through the transport


def payload_tensors(payload: bytes) -> dict[str, torch.Tensor]:
    """A payload as the state dict the transport streams (one uint8 tensor)."""
    return {COMPRESSED: torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())}


def payload_layout(nbytes: int) -> Layout:
    """The layout a receiver expects for a payload of `nbytes` (as declared; bounded by the caller)."""
    return Layout((TensorLayout(COMPRESSED, "uint8", (nbytes,), 0, nbytes),), nbytes)


def max_payload_bytes(n: int) -> int:
    """More than any valid payload of an `n`-value update can take (header, bitmap, float32 values)."""
    return _HEADER.size + (n + 7) // 8 + 4 * n + 64


def float_count(params: Mapping[str, torch.Tensor]) -> int:
    return sum(params[k].numel() for k in float_names(params))


def encode_update(trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], scheme: Scheme,
                  residual: np.ndarray | None, rng: np.random.Generator) -> tuple[bytes, np.ndarray | None]:
    """A client's payload for `trained - base`, plus its new residual when error feedback is on."""
    names = float_names(base)
    delta = model_delta(trained, base, names)
    if residual is None:
        return compress(delta, scheme, rng), None
    return ErrorFeedback(residual).step(delta, scheme, rng)


def decode_update(payload: bytes | memoryview, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model a payload describes: `base` plus its checked delta (`Rejected` on any malformed part)."""
    names = float_names(base)
    return apply_delta(base, decompress(payload, float_count(base)), names)


MAX_CHAIN = 16  # steps in one download at most (compression.downlink.history's bound)


def chain_names(steps: int) -> list[str]:
    """The tensor names of a download of `steps` downlink steps, oldest first: compressed, compressed.1, ..."""
    return [COMPRESSED, *(f"{COMPRESSED}.{i}" for i in range(1, steps))]


def chain_tensors(payloads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Downlink step payloads (uint8 tensors, oldest first) as the state dict a download streams; the tensors
    themselves, not copies (the transport cuts its chunks from their memory)."""
    return dict(zip(chain_names(len(payloads)), payloads, strict=True))


def decode_chain(received: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global model after applying a download's steps to `held`, oldest first, each checked and applied
    exactly as the server applied it (`downlink_step`): the result is the server's copy bit for bit."""
    names = list(received)
    if not 1 <= len(names) <= MAX_CHAIN or names != chain_names(len(names)):
        raise Rejected("malformed", f"a compressed download of tensors {names[:4]}; expected "
                       f"{chain_names(min(max(len(names), 1), 3))}... (1 to {MAX_CHAIN} steps)")
    out = dict(held)
    for name in names:
        t = received[name]
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise Rejected("malformed", f"download step {name} is {t.dtype} of shape {tuple(t.shape)}")
        out = decode_update(t.numpy().data, out)
    return out


@dataclass(frozen=True)
class DownlinkStep:
    """One compressed step of the global model: the payload, and what a worker holds after applying it."""

    payload: bytes
    held: dict[str, torch.Tensor]


def downlink_step(held: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], scheme: Scheme,
                  rng: np.random.Generator) -> DownlinkStep:
    """Compress `target - held`. The new `held` is computed exactly as the worker will (`decode_update`), so
    server and workers agree bit for bit, and the next delta is taken from it: the quantisation error never
    accumulates beyond one step."""
    payload = compress(model_delta(target, held, float_names(held)), scheme, rng)
    return DownlinkStep(payload, decode_update(payload, held))
