"""The wire format: flat blob + TensorSpecs + checksummed chunks, validated before use."""

from __future__ import annotations

import pytest
import torch

from federator.runtime.transport import BlobAssembler, Layout, Rejected, decode, encode, layout_from_specs


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
