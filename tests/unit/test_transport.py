"""The wire format: TensorSpecs + chunks with running CRC-32Cs, validated before use; chunk frames."""

from __future__ import annotations

import pytest
import torch

from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.transport import (
    BlobAssembler,
    Layout,
    Rejected,
    checksum,
    chunk_frame,
    decode,
    encode,
    layout_from_specs,
    read_chunk,
)


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(33, 17, generator=g),
        "b": torch.randn(17, generator=g).double(),  # an odd offset for an 8-byte dtype after 33*17 floats
        "h": torch.randn(5, generator=g).half(),
        "bf": torch.randn(3, 3, generator=g).to(torch.bfloat16),
        "n": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1024, 1 << 20])
def test_round_trip_is_exact_for_every_dtype_and_chunk_size(chunk_bytes: int) -> None:
    p = params()
    enc = encode(p)
    out = decode(enc.specs, enc.total_bytes, list(enc.chunks(chunk_bytes)), Layout.of(p))
    assert list(out) == list(p)
    for k in p:
        assert out[k].dtype == p[k].dtype and out[k].shape == p[k].shape
        assert torch.equal(out[k], p[k])


def test_decoded_tensors_do_not_alias_the_sender() -> None:
    p = params()
    enc = encode(p)
    out = decode(enc.specs, enc.total_bytes, list(enc.chunks()), Layout.of(p))
    out["w"].add_(1.0)
    assert not torch.equal(out["w"], p["w"])


def test_layout_from_specs_matches_the_model_layout() -> None:
    p = params()
    assert layout_from_specs(encode(p).specs) == Layout.of(p)


def test_out_of_order_chunk_is_rejected() -> None:
    p = params()
    enc = encode(p)
    chunks = list(enc.chunks(256))
    asm = BlobAssembler(enc.specs, enc.total_bytes, Layout.of(p))
    with pytest.raises(Rejected) as err:
        asm.add(chunks[1])
    assert err.value.reason == "corrupt_chunk"


def test_chunk_past_the_end_is_rejected() -> None:
    p = {"w": torch.zeros(10)}
    enc = encode(p)
    (chunk,) = list(enc.chunks())
    asm = BlobAssembler(enc.specs, enc.total_bytes, Layout.of(p))
    asm.add(chunk)
    with pytest.raises(Rejected) as err:
        asm.add(type(chunk)(offset=40, data=b"\0" * 4, crc32=0))
    assert err.value.reason == "oversized"


def test_renamed_tensor_and_missing_tensor_are_rejected() -> None:
    p = params()
    renamed = {("x" if k == "w" else k): v for k, v in p.items()}
    with pytest.raises(Rejected) as err:
        BlobAssembler(encode(renamed).specs, encode(renamed).total_bytes, Layout.of(p))
    assert err.value.reason == "wrong_shape" and "'x'" in err.value.detail
    fewer = dict(list(p.items())[:-1])
    with pytest.raises(Rejected) as err:
        BlobAssembler(encode(fewer).specs, encode(fewer).total_bytes, Layout.of(p))
    assert err.value.reason == "wrong_shape"


def test_non_finite_values_in_any_float_dtype_are_rejected() -> None:
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        p = {"w": torch.tensor([1.0, float("inf")], dtype=dtype)}
        enc = encode(p)
        with pytest.raises(Rejected) as err:
            decode(enc.specs, enc.total_bytes, list(enc.chunks()), Layout.of(p))
        assert err.value.reason == "non_finite"


@pytest.mark.parametrize("chunk_bytes", [1, 3, 5, 8, 4096])
@pytest.mark.parametrize("where", [0, 13, 39])
def test_non_finite_is_found_whatever_the_chunk_cuts_through(chunk_bytes: int, where: int) -> None:
    """The scan runs per chunk over whole elements: cuts inside an element, and a float64 tensor at an odd
    offset (after 3 float16s), still see every value."""
    w = torch.zeros(40, dtype=torch.float64)
    w[where] = float("nan")
    p = {"h": torch.zeros(3, dtype=torch.float16), "w": w}
    enc = encode(p)
    with pytest.raises(Rejected) as err:
        decode(enc.specs, enc.total_bytes, list(enc.chunks(chunk_bytes)), Layout.of(p))
    assert err.value.reason == "non_finite"
    w[where] = 1.0
    enc = encode(p)
    out = decode(enc.specs, enc.total_bytes, list(enc.chunks(chunk_bytes)), Layout.of(p))
    assert torch.equal(out["w"], w)


def test_empty_tensors_anywhere_round_trip() -> None:
    p = {"e0": torch.empty(0), "w": torch.arange(6.0).reshape(2, 3), "e1": torch.empty(0, 4), "e2": torch.empty(0)}
    enc = encode(p)
    out = decode(enc.specs, enc.total_bytes, list(enc.chunks(8)), Layout.of(p))
    assert [tuple(t.shape) for t in out.values()] == [(0,), (2, 3), (0, 4), (0,)]
    assert torch.equal(out["w"], p["w"])


def test_chunks_stay_inside_one_tensor_and_carry_its_running_crc32() -> None:
    p = params()
    enc = encode(p, chunk_bytes=100)
    blob = enc.blob
    for spec in enc.specs:
        mine = [c for c in enc.chunks() if spec.offset <= c.offset < spec.offset + spec.nbytes]
        assert b"".join(c.data for c in mine) == blob[spec.offset : spec.offset + spec.nbytes]
        for c in mine:
            assert c.offset + len(c.data) <= spec.offset + spec.nbytes  # never crosses into the next tensor
            assert c.crc32 == checksum(blob[spec.offset : c.offset + len(c.data)])
        assert mine[-1].crc32 == spec.crc32 == checksum(bytes(p[spec.name].view(-1).view(torch.uint8).numpy()))


def _assemble(enc_specs: list[pb.TensorSpec], chunks: list[pb.Chunk], p: dict[str, torch.Tensor]) -> None:
    asm = BlobAssembler(enc_specs, sum(s.nbytes for s in enc_specs), Layout.of(p))
    for c in chunks:
        asm.add(c)
    asm.finish()


def test_flipped_byte_wrong_declared_crc_and_crossing_chunks_are_rejected() -> None:
    p = {"a": torch.arange(64, dtype=torch.float32), "b": torch.arange(64, dtype=torch.float32)}
    enc = encode(p, chunk_bytes=64)
    chunks = list(enc.chunks())
    flipped = bytearray(chunks[2].data)
    flipped[3] ^= 0x01
    bad = [*chunks[:2], pb.Chunk(offset=chunks[2].offset, data=bytes(flipped), crc32=chunks[2].crc32), *chunks[3:]]
    with pytest.raises(Rejected) as err:
        _assemble(list(enc.specs), bad, p)
    assert err.value.reason == "corrupt_chunk"

    specs = [pb.TensorSpec() for _ in enc.specs]
    for new, old in zip(specs, enc.specs, strict=True):
        new.CopyFrom(old)
    specs[1].crc32 ^= 1  # every chunk consistent with its data; the tensor's declared crc32 is not
    with pytest.raises(Rejected) as err:
        _assemble(specs, chunks, p)
    assert err.value.reason == "checksum_mismatch" and "b:" in err.value.detail

    blob = enc.blob
    crossing = pb.Chunk(offset=0, data=blob[:300], crc32=checksum(blob[:300]))  # a: 256 bytes, b: 256
    with pytest.raises(Rejected) as err:
        _assemble(list(enc.specs), [crossing], p)
    assert err.value.reason == "malformed"

    with pytest.raises(Rejected) as err:
        _assemble(list(enc.specs), [pb.Chunk(offset=0, data=b"", crc32=0)], p)
    assert err.value.reason == "malformed"


# ------------------------------------------------------------------------------ chunk frames


@pytest.mark.parametrize("offset,crc", [(0, 0), (0, 1), (5, 0), (300, 0xFFFFFFFF), ((1 << 40) + 3, 12345)])
@pytest.mark.parametrize("size", [1, 127, 128, 70_000])
def test_a_chunk_frame_is_the_protobuf_serialization_of_both_stream_messages(offset: int, crc: int,
                                                                             size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = chunk_frame(offset, memoryview(data), crc)
    chunk = pb.Chunk(offset=offset, data=data, crc32=crc)
    assert frame == pb.TaskMessage(chunk=chunk).SerializeToString()
    assert frame == pb.UpdateMessage(chunk=chunk).SerializeToString()
    for message in (pb.TaskMessage, pb.UpdateMessage):
        got = read_chunk(frame, message)
        assert isinstance(got.data, memoryview)  # the fast path: a view, not a copy
        assert (got.offset, bytes(got.data), got.crc32) == (offset, data, crc)


def test_frames_decode_to_the_same_model_as_chunks() -> None:
    p = params()
    enc = encode(p)
    asm = BlobAssembler(enc.specs, enc.total_bytes, Layout.of(p))
    for frame in enc.frames(100):
        asm.add(read_chunk(frame, pb.UpdateMessage))
    out = asm.finish()
    assert all(torch.equal(out[k], p[k]) for k in p)


def test_unusual_but_valid_encodings_follow_protobuf_rules() -> None:
    """Fields out of order, or a repeated field (the last one wins), go through protobuf's own parser."""
    inner = b"\x12\x03abc\x08\x05\x18\x07"  # data, offset 5, crc 7
    reordered = b"\x12" + bytes([len(inner)]) + inner
    got = read_chunk(reordered, pb.UpdateMessage)
    assert (got.offset, bytes(got.data), got.crc32) == (5, b"abc", 7)
    inner = b"\x08\x01\x12\x01x\x12\x02yz"  # data twice: protobuf keeps the last
    twice = b"\x12" + bytes([len(inner)]) + inner
    got = read_chunk(twice, pb.UpdateMessage)
    assert bytes(got.data) == pb.UpdateMessage.FromString(twice).chunk.data == b"yz"


@pytest.mark.parametrize("raw,detail", [
    (pb.UpdateMessage(header=pb.UpdateHeader(task_id="t")).SerializeToString(), "second header"),
    (b"", "without a chunk"),
    (b"\x12\x10\x08\x01", "not valid protobuf"),  # declares 16 bytes, has 2
    (b"\x12\x04\x12\x09abc", "not valid protobuf"),  # data longer than its message
    (b"\xff\xff\xff", "not valid protobuf"),
])
def test_a_stream_message_that_is_not_a_chunk_is_rejected(raw: bytes, detail: str) -> None:
    with pytest.raises(Rejected) as err:
        read_chunk(raw, pb.UpdateMessage)
    assert err.value.reason == "malformed"
    assert detail in err.value.detail


def test_checksum_is_crc32c_and_runs_on() -> None:
    assert checksum(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    assert checksum(b"6789", checksum(b"12345")) == checksum(b"123456789")


def test_prebuilt_frames_are_the_same_bytes_for_every_send() -> None:
    p = params()
    enc = encode(p, chunk_bytes=100)
    pre = enc.prebuilt()
    first, second = list(pre.frames()), list(pre.frames())
    assert first == list(enc.frames())  # the same wire bytes as frames built on the fly
    assert all(a is b for a, b in zip(first, second, strict=True))  # built once, not per send
    assert pre.prebuilt() is pre
    assert list(pre.frames(64)) == list(enc.frames(64))  # another chunk size still cuts afresh
    asm = BlobAssembler(pre.specs, pre.total_bytes, Layout.of(p))
    for frame in pre.frames():
        asm.add(read_chunk(frame, pb.TaskMessage))
    out = asm.finish()
    assert all(torch.equal(out[k], p[k]) for k in p)


def test_the_downlink_serialises_each_model_version_once_for_all_workers() -> None:
    from federator.api.models import DownlinkCompressionSpec
    from federator.runtime.downlink import Downlink

    p = {"w": torch.randn(300), "b": torch.randn(3)}
    down = Downlink(DownlinkCompressionSpec(), p, version=1, chunk_bytes=256)
    one, two = down.offer(0).encoded, down.offer(0).encoded
    assert one is not None and two is not None
    assert all(a is b for a, b in zip(one.frames(), two.frames(), strict=True))
    new = {k: v + 1 for k, v in p.items()}
    down.commit(down.prepare(new, version=2))
    enc = down.offer(1).encoded
    assert enc is not None and enc.built is not None
    asm = BlobAssembler(enc.specs, enc.total_bytes, Layout.of(new))
    for frame in enc.frames():
        asm.add(read_chunk(frame, pb.TaskMessage))
    assert all(torch.equal(v, new[k]) for k, v in asm.finish().items())
