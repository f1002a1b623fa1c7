"""The pipelined receive path: chunk checks on a second thread (CheckThread), with the same outcome, the
same rejection (reason and detail) as the sequential path, and no thread left behind however a stream ends."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from federator.runtime.checkthread import THREAD_NAME, CheckThread
from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.transport import (
    PIPELINE_MIN_BYTES,
    BlobAssembler,
    Layout,
    Rejected,
    encode,
    read_chunk,
)
from tests.helpers.waiting import wait_for


def check_threads() -> int:
    return sum(t.name == THREAD_NAME for t in threading.enumerate())


def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(64, 100, generator=g),
        "empty": torch.empty(0),
        "b": torch.randn(100, generator=g).double(),
        "h": torch.randn(33, generator=g).half(),
        "bf": torch.randn(7, generator=g).to(torch.bfloat16),
        "n": torch.arange(5),
    }


def chunks_of(p: dict[str, torch.Tensor], chunk_bytes: int = 512) -> list[pb.Chunk]:
    return list(encode(p).chunks(chunk_bytes))


def outcome(p: dict[str, torch.Tensor], chunks: list[pb.Chunk], pipelined: bool,
            specs: list[pb.TensorSpec] | None = None) -> tuple[str, str] | dict[str, torch.Tensor]:
    """What assembling `chunks` gives: the tensors, or the rejection's (reason, detail)."""
    enc = encode(p)
    declared = specs if specs is not None else list(enc.specs)
    try:
        with BlobAssembler(declared, enc.total_bytes, Layout.of(p), max_chunk_bytes=4096,
                           pipelined=pipelined) as asm:
            for c in chunks:
                asm.add(c)
            return asm.finish()
    except Rejected as exc:
        return exc.reason, exc.detail


def flip(chunks: list[pb.Chunk], i: int) -> list[pb.Chunk]:
    data = bytearray(chunks[i].data)
    data[len(data) // 2] ^= 0x10
    return [*chunks[:i], pb.Chunk(offset=chunks[i].offset, data=bytes(data), crc32=chunks[i].crc32), *chunks[i + 1:]]


def with_value(p: dict[str, torch.Tensor], name: str, index: int, value: float) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in p.items()}
    out[name].view(-1)[index] = value
    return out


@pytest.mark.parametrize("chunk_bytes", [1, 7, 512, 4096])
def test_pipelined_round_trip_is_exact(chunk_bytes: int) -> None:
    p = model()
    out = outcome(p, chunks_of(p, chunk_bytes), pipelined=True)
    assert isinstance(out, dict) and list(out) == list(p)
    assert all(out[k].dtype == p[k].dtype and torch.equal(out[k], p[k]) for k in p)


# each case: a bad stream of the model's chunks, and the reason it must be rejected with
BAD: dict[str, tuple[str, Callable[[dict[str, torch.Tensor]], list[pb.Chunk]]]] = {
    "a flipped byte in a middle chunk": ("corrupt_chunk", lambda p: flip(chunks_of(p), 20)),
    "a flipped byte in the last chunk": ("corrupt_chunk", lambda p: flip(chunks_of(p), len(chunks_of(p)) - 1)),
    "NaN in the middle of w": ("non_finite", lambda p: chunks_of(with_value(p, "w", 3200, float("nan")))),
    "Inf at the end of b": ("non_finite", lambda p: chunks_of(with_value(p, "b", 99, float("inf")))),
    "a chunk missing in the middle": ("corrupt_chunk", lambda p: [c for i, c in enumerate(chunks_of(p)) if i != 9]),
    "the last chunk missing": ("missing_chunks", lambda p: chunks_of(p)[:-1]),
    "an oversized chunk after good ones": ("oversized", lambda p: [*chunks_of(p)[:5], pb.Chunk(
        offset=chunks_of(p)[5].offset, data=b"\0" * 5000, crc32=0)]),
    # the chunk at 12 fails its crc32 (found on the check thread), the one after it is out of place (found
    # at once): the first failure in stream order wins, as it does on one thread
    "a corrupt chunk, then one out of place": ("corrupt_chunk", lambda p: [
        *flip(chunks_of(p), 12)[:13], chunks_of(p)[20]]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_chunk_is_rejected_with_the_same_reason_and_detail_as_on_one_thread(case: str) -> None:
    reason, make = BAD[case]
    p = model()
    chunks = make(p)
    sequential = outcome(p, chunks, pipelined=False)
    pipelined = outcome(p, chunks, pipelined=True)
    assert isinstance(sequential, tuple) and sequential[0] == reason, sequential
    assert pipelined == sequential
    assert wait_for(lambda: check_threads() == 0, 30, "the check thread to end")


def test_a_wrong_declared_tensor_checksum_is_rejected_on_the_check_thread() -> None:
    p = model()
    specs = [pb.TensorSpec() for _ in encode(p).specs]
    for new, old in zip(specs, encode(p).specs, strict=True):
        new.CopyFrom(old)
    specs[0].crc32 ^= 1  # w: every chunk consistent with its data, the tensor's declared checksum wrong
    specs[1].crc32 = 5  # empty: its checksum must be 0; w comes first in stream order
    for pipelined in (False, True):
        assert outcome(p, chunks_of(p), pipelined, specs) == ("checksum_mismatch",
                                                               "w: crc32 differs from the declared one")


def test_a_rejected_stream_leaves_the_callers_model_unchanged() -> None:
    """The receiver's pattern: the model is replaced only by what `finish` returns, and a stream with a
    corrupt chunk in the middle never gets there, even though later chunks were already read."""
    p = model()
    held = {k: v.clone() for k, v in p.items()}
    update = {k: v + 1 if v.is_floating_point() else v for k, v in p.items()}
    bad = flip(chunks_of(update), 20)
    read = []

    def stream() -> Iterator[bytes]:
        for i, c in enumerate(bad):
            read.append(i)
            yield pb.UpdateMessage(chunk=c).SerializeToString()

    enc = encode(update)
    with pytest.raises(Rejected) as err, BlobAssembler(enc.specs, enc.total_bytes, Layout.of(p),
                                                       pipelined=True) as asm:
        for raw in stream():
            asm.add(read_chunk(raw, pb.UpdateMessage))
        held = asm.finish()
    assert err.value.reason == "corrupt_chunk" and "offset 10240" in err.value.detail
    assert all(torch.equal(held[k], p[k]) for k in p)
    assert wait_for(lambda: check_threads() == 0, 30, "the check thread to end")


def test_no_thread_is_left_after_an_aborted_stream() -> None:
    """A stream that breaks off (the client went away) ends the check thread: through `with`, and through
    garbage collection when the owner never closes it."""
    p = model()
    chunks = chunks_of(p)
    before = check_threads()

    def broken() -> Iterator[pb.Chunk]:
        yield from chunks[:10]
        raise ConnectionError("the stream broke off")

    enc = encode(p)
    with pytest.raises(ConnectionError), BlobAssembler(enc.specs, enc.total_bytes, Layout.of(p),
                                                       pipelined=True) as asm:
        for c in broken():
            asm.add(c)
    assert check_threads() == before  # `close` joined it

    abandoned = BlobAssembler(enc.specs, enc.total_bytes, Layout.of(p), pipelined=True)
    for c in chunks[:10]:
        abandoned.add(c)
    assert check_threads() == before + 1
    del abandoned, c
    gc.collect()
    assert wait_for(lambda: check_threads() == before, 30, "the abandoned check thread to end")


def test_large_models_are_pipelined_and_small_ones_are_not() -> None:
    small = {"w": torch.zeros(10)}
    enc = encode(small)
    before = check_threads()
    with BlobAssembler(enc.specs, enc.total_bytes, Layout.of(small)):
        assert check_threads() == before
    large = {"w": torch.zeros(PIPELINE_MIN_BYTES // 4)}
    enc = encode(large)
    with BlobAssembler(enc.specs, enc.total_bytes, Layout.of(large)) as asm:
        assert check_threads() == before + 1
        for c in enc.chunks():
            asm.add(c)
        assert torch.equal(asm.finish()["w"], large["w"])
        assert check_threads() == before


def test_check_thread_runs_calls_in_order_and_drops_the_rest_after_a_failure() -> None:
    ran: list[int] = []

    def call(i: int) -> None:
        if i == 5:
            raise Rejected("corrupt_chunk", "five")
        ran.append(i)

    checks = CheckThread(depth=2)
    for i in range(10):
        checks.submit(call, i)
    error = checks.stop()
    assert isinstance(error, Rejected) and error.detail == "five"
    assert ran == [0, 1, 2, 3, 4]
    assert checks.failed and checks.stop() is error  # idempotent


def test_check_thread_hands_back_an_unexpected_error_as_it_is() -> None:
    def boom() -> None:
        raise ZeroDivisionError("bug")

    checks = CheckThread()
    checks.submit(boom)
    assert isinstance(checks.stop(), ZeroDivisionError)
