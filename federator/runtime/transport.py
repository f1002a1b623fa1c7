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
    """The tensor's bytes, without a copy when it already is a contiguous CPU tensor."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr: Any = t.numpy()
    return memoryview(arr.reshape(-1).view(np.uint8))


@dataclass(frozen=True)
class Cut:
    """One chunk: bytes [start, end) of tensor `index`; `crc32` runs from the tensor's first byte."""

    index: int
    start: int
    end: int
    crc32: int


def _cuts(views: Sequence[memoryview], chunk_bytes: int) -> list[Cut]:
    """Chunks that never cross a tensor boundary, each with the running crc32 of its tensor.

    One pass over the bytes gives both checksums: a chunk's crc32 is crc32(tensor[0:end]), so a
    receiver checks every chunk as it arrives, and the last chunk's value is the tensor's crc32.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    cuts = []
    for i, view in enumerate(views):
        crc = 0
        for start in range(0, len(view), chunk_bytes):
            end = min(start + chunk_bytes, len(view))
            crc = zlib.crc32(view[start:end], crc)
            cuts.append(Cut(i, start, end, crc))
    return cuts


@dataclass(frozen=True)
class Encoded:
    """A state dict ready to stream: TensorSpecs plus checksummed cuts over the tensors' own memory.

    Nothing is flattened: a chunk's bytes are copied straight from its tensor when it is sent. The
    tensors must not be changed in place afterwards (a receiver would reject the chunks as corrupt).
    """

    specs: tuple[pb.TensorSpec, ...]
    views: tuple[memoryview, ...]
    cuts: tuple[Cut, ...]
    chunk_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(len(v) for v in self.views)

    @property
    def blob(self) -> bytes:
        """The flat wire image (for tests and debugging; streaming never builds it)."""
        return b"".join(bytes(v) for v in self.views)

    def chunks(self, chunk_bytes: int | None = None) -> Iterator[pb.Chunk]:
        cuts = self.cuts if chunk_bytes in (None, self.chunk_bytes) else _cuts(self.views, int(chunk_bytes or 1))
        for c in cuts:
            yield pb.Chunk(offset=self.specs[c.index].offset + c.start,
                           data=bytes(self.views[c.index][c.start : c.end]), crc32=c.crc32)


def encode(params: Mapping[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Encoded:
    """Specs and chunk checksums of a state dict, in one pass over its bytes and without copying them."""
    layout = Layout.of(params)
    views = tuple(_as_bytes(t) for t in params.values())
    cuts = _cuts(views, chunk_bytes)
    last = {c.index: c.crc32 for c in cuts}  # a tensor's last running crc32 is its crc32 (0 when empty)
    specs = tuple(
        pb.TensorSpec(name=tl.name, dtype=tl.dtype, shape=list(tl.shape), offset=tl.offset, nbytes=tl.nbytes,
                      crc32=last.get(i, 0))
        for i, tl in enumerate(layout.tensors)
    )
    return Encoded(specs, views, tuple(cuts), chunk_bytes)


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
    """Receives chunks in order into a preallocated buffer and turns them into validated tensors.

    Each chunk's running crc32 is checked as it arrives (`corrupt_chunk`), and at the end of each
    tensor against the tensor's declared crc32 (`checksum_mismatch`): the bytes are read once.
    """

    def __init__(self, declared: Sequence[pb.TensorSpec], total_bytes: int, expected: Layout,
                 max_chunk_bytes: int | None = None) -> None:
        check_layout(declared, total_bytes, expected)
        self._max_chunk = max_chunk_bytes
        self._specs = list(declared)
        self._buf = bytearray(total_bytes)
        self._next = 0
        self._tensor = 0  # index of the tensor the next chunk belongs to
        self._crc = 0  # running crc32 of that tensor so far

    @property
    def received(self) -> int:
        return self._next

    def _skip_empty(self) -> None:
        while self._tensor < len(self._specs) and self._specs[self._tensor].nbytes == 0:
            self._close(self._specs[self._tensor], 0)  # empty tensors get no chunks: crc32(b"") == 0
            self._tensor += 1

    @staticmethod
    def _close(spec: pb.TensorSpec, crc: int) -> None:
        if crc != spec.crc32:
            raise Rejected("checksum_mismatch", f"{spec.name}: crc32 differs from the declared one")

    def add(self, chunk: pb.Chunk) -> None:
        data = chunk.data  # every read of a bytes field copies it
        size = len(data)
        if self._max_chunk is not None and size > self._max_chunk:
            raise Rejected("oversized", f"a {size}-byte message; the limit is {self._max_chunk}")
        if chunk.offset != self._next:
            raise Rejected("corrupt_chunk", f"chunk at offset {chunk.offset}, expected {self._next}")
        if self._next + size > len(self._buf):
            raise Rejected("oversized", f"chunk ends at byte {self._next + size} of {len(self._buf)}")
        if size == 0:
            raise Rejected("malformed", f"empty chunk at offset {chunk.offset}")
        self._skip_empty()
        spec = self._specs[self._tensor]  # exists: the bytes so far end before total_bytes
        end = spec.offset + spec.nbytes
        if self._next + size > end:
            raise Rejected("malformed", f"chunk at offset {chunk.offset} runs past the end of {spec.name}")
        crc = zlib.crc32(data, self._crc)
        if crc != chunk.crc32:
            raise Rejected("corrupt_chunk", f"chunk at offset {chunk.offset} fails its crc32")
        self._buf[self._next : self._next + size] = data
        self._next += size
        self._crc = crc
        if self._next == end:
            self._close(spec, crc)
            self._tensor += 1
            self._crc = 0

    def finish(self, check_finite: bool = True) -> Params:
        if self._next != len(self._buf):
            raise Rejected("missing_chunks", f"received {self._next} of {len(self._buf)} bytes")
        self._skip_empty()  # trailing empty tensors
        out: Params = {}
        for spec in self._specs:
            t = _tensor_from(self._buf, spec.offset, spec.nbytes, spec.dtype, tuple(spec.shape))
            if check_finite and t.is_floating_point() and not _all_finite(t):
                raise Rejected("non_finite", f"{spec.name}: contains NaN or Inf")
            out[spec.name] = t
        self._buf = bytearray()  # the tensors own the bytes now; this assembler is done
        return out


def _all_finite(t: torch.Tensor) -> bool:
    if t.dtype == torch.bfloat16:  # no numpy type
        return bool(torch.isfinite(t).all())
    return bool(np.isfinite(t.numpy()).all())  # several times faster than torch.isfinite on one thread


def _tensor_from(buf: bytearray, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over `buf[offset:offset+nbytes]`: a view when aligned for the dtype, else a copy."""
    tdtype = _TORCH_BY_NAME[dtype]
    wire = torch.int16 if tdtype == torch.bfloat16 else tdtype
    if nbytes == 0:
        return torch.empty(shape, dtype=tdtype)
    itemsize = torch.empty((), dtype=wire).element_size()
    arr = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=offset)
    if arr.ctypes.data % itemsize:
        arr = arr.copy()  # numpy allocations are aligned
    t = torch.from_numpy(arr).view(wire)
    if wire is not tdtype:
        t = t.view(tdtype)
    return t.reshape(shape)


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
