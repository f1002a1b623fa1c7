"""Tensors on the wire: one flat blob described by TensorSpecs, cut into checksummed chunks. No pickle.

The sender flattens a state dict once (`encode`) and streams `chunks()`; the receiver checks the declared
layout against the one it expects before accepting a byte (`BlobAssembler`), checks each chunk's crc32 as
it arrives, then each tensor's crc32 and finiteness (`finish`). Any failure raises `Rejected` with a
machine-readable reason, so a hostile or corrupt update never reaches the model.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from federator.runtime.proto import federator_pb2 as pb

Params = dict[str, torch.Tensor]

DEFAULT_CHUNK_BYTES = 1 << 20
# A worker that lost the server retries at most this far apart; the server lingers at least this long.
RECONNECT_BACKOFF_MAX = 2.0

# torch dtype <-> wire name (numpy's names; bfloat16 has no numpy type and travels as raw 2-byte words)
_TORCH_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAME_BY_TORCH = {v: k for k, v in _TORCH_BY_NAME.items()}

REJECTION_REASONS = (
    "bad_token",
    "unknown_worker",
    "unknown_task",
    "wrong_round",
    "stale_version",
    "duplicate",
    "malformed",
    "wrong_shape",
    "wrong_dtype",
    "oversized",
    "corrupt_chunk",
    "missing_chunks",
    "checksum_mismatch",
    "non_finite",
    "aborted",
)


class Rejected(Exception):
    """An update (or download) that must not be used; `reason` is one of REJECTION_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TensorLayout:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """Names, dtypes and shapes of a model's tensors in wire order."""

    tensors: tuple[TensorLayout, ...]
    total_bytes: int

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> Layout:
        out, offset = [], 0
        for name, t in params.items():
            nbytes = t.numel() * t.element_size()
            out.append(TensorLayout(name, dtype_name(t.dtype), tuple(t.shape), offset, nbytes))
            offset += nbytes
        return cls(tuple(out), offset)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAME_BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent; use one of {sorted(_TORCH_BY_NAME)}") from None


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr: Any = t.numpy()
    return memoryview(arr).cast("B")


@dataclass(frozen=True)
class Encoded:
    """A flattened state dict ready to stream: specs plus one contiguous blob."""

    specs: tuple[pb.TensorSpec, ...]
    blob: bytes

    @property
    def total_bytes(self) -> int:
        return len(self.blob)

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.Chunk]:
        view = memoryview(self.blob)
        for start in range(0, len(view), chunk_bytes):
            part = view[start : start + chunk_bytes]
            yield pb.Chunk(offset=start, data=bytes(part), crc32=zlib.crc32(part))


def encode(params: Mapping[str, torch.Tensor]) -> Encoded:
    """Flatten a state dict into specs and one blob (one copy of the weights)."""
    layout = Layout.of(params)
    blob = bytearray(layout.total_bytes)
    specs = []
    for tl, t in zip(layout.tensors, params.values(), strict=True):
        raw = _as_bytes(t)
        blob[tl.offset : tl.offset + tl.nbytes] = raw
        specs.append(
            pb.TensorSpec(
                name=tl.name, dtype=tl.dtype, shape=list(tl.shape), offset=tl.offset,
                nbytes=tl.nbytes, crc32=zlib.crc32(raw),
            )
        )
    return Encoded(tuple(specs), bytes(blob))


def check_layout(declared: Sequence[pb.TensorSpec], total_bytes: int, expected: Layout) -> None:
    """Reject a declared layout that differs from the expected one in any name, dtype, shape or size."""
    if len(declared) != len(expected.tensors):
        raise Rejected("wrong_shape", f"{len(declared)} tensors declared, the model has {len(expected.tensors)}")
    for spec, want in zip(declared, expected.tensors, strict=True):
        if spec.name != want.name:
            raise Rejected("wrong_shape", f"tensor {spec.name!r} where {want.name!r} was expected")
        if spec.dtype != want.dtype:
            raise Rejected("wrong_dtype", f"{want.name}: dtype {spec.dtype!r}, expected {want.dtype!r}")
        if tuple(spec.shape) != want.shape:
            raise Rejected("wrong_shape", f"{want.name}: shape {tuple(spec.shape)}, expected {want.shape}")
    if total_bytes > expected.total_bytes:
        raise Rejected("oversized", f"declares {total_bytes} bytes, the model has {expected.total_bytes}")
    for spec, want in zip(declared, expected.tensors, strict=True):
        if spec.offset != want.offset or spec.nbytes != want.nbytes:
            raise Rejected("malformed", f"{want.name}: offset/size {spec.offset}/{spec.nbytes} do not match")
    if total_bytes != expected.total_bytes:
        raise Rejected("malformed", f"declares {total_bytes} bytes, the model has {expected.total_bytes}")


class BlobAssembler:
    """Receives chunks in order into a preallocated buffer and turns them into validated tensors."""

    def __init__(self, declared: Sequence[pb.TensorSpec], total_bytes: int, expected: Layout,
                 max_chunk_bytes: int | None = None) -> None:
        check_layout(declared, total_bytes, expected)
        self._max_chunk = max_chunk_bytes
        self._specs = list(declared)
        self._buf = bytearray(total_bytes)
        self._next = 0

    @property
    def received(self) -> int:
        return self._next

    def add(self, chunk: pb.Chunk) -> None:
        size = len(chunk.data)
        if self._max_chunk is not None and size > self._max_chunk:
            raise Rejected("oversized", f"a {size}-byte message; the limit is {self._max_chunk}")
        if chunk.offset != self._next:
            raise Rejected("corrupt_chunk", f"chunk at offset {chunk.offset}, expected {self._next}")
        if self._next + size > len(self._buf):
            raise Rejected("oversized", f"chunk ends at byte {self._next + size} of {len(self._buf)}")
        if zlib.crc32(chunk.data) != chunk.crc32:
            raise Rejected("corrupt_chunk", f"chunk at offset {chunk.offset} fails its crc32")
        self._buf[self._next : self._next + size] = chunk.data
        self._next += size

    def finish(self, check_finite: bool = True) -> Params:
        if self._next != len(self._buf):
            raise Rejected("missing_chunks", f"received {self._next} of {len(self._buf)} bytes")
        view = memoryview(self._buf)
        out: Params = {}
        for spec in self._specs:
            raw = view[spec.offset : spec.offset + spec.nbytes]
            if zlib.crc32(raw) != spec.crc32:
                raise Rejected("checksum_mismatch", f"{spec.name}: crc32 differs from the declared one")
            out[spec.name] = _tensor_from(raw, spec.dtype, tuple(spec.shape))
            t = out[spec.name]
            if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise Rejected("non_finite", f"{spec.name}: contains NaN or Inf")
        return out


def _tensor_from(raw: memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor that owns a copy of `raw` (offsets need not be aligned for the dtype)."""
    tdtype = _TORCH_BY_NAME[dtype]
    if tdtype == torch.bfloat16:
        return torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.frombuffer(raw, dtype=np.dtype(dtype)).copy()).reshape(shape)


def decode(declared: Sequence[pb.TensorSpec], total_bytes: int, chunks: Sequence[pb.Chunk],
           expected: Layout) -> Params:
    """Assemble and validate a complete set of chunks (used for downloads and in tests)."""
    asm = BlobAssembler(declared, total_bytes, expected)
    for c in chunks:
        asm.add(c)
    return asm.finish()


def layout_from_specs(specs: Sequence[pb.TensorSpec]) -> Layout:
    tensors = tuple(TensorLayout(s.name, s.dtype, tuple(s.shape), s.offset, s.nbytes) for s in specs)
    if any(t.dtype not in _TORCH_BY_NAME for t in tensors):
        raise Rejected("wrong_dtype", "unknown dtype in layout")
    return Layout(tensors, sum(t.nbytes for t in tensors))
