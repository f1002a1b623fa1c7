"""The compression codec: round trips within their bounds, error feedback's invariant, the wire format's
size choices, and every malformed payload rejected with its reason before a value is returned."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from federator.runtime import compression as c
from federator.runtime.transport import Rejected


def update(n: int = 10_000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def rng() -> np.random.Generator:
    return np.random.default_rng(42)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_quantisation_error_is_within_one_step_of_its_chunk(bits: int, chunk: int) -> None:
    x = update(1000)
    x[:300] *= 100  # chunks of very different scales
    out = c.decompress(c.compress(x, c.Scheme(bits=bits, chunk=chunk), rng()), x.size)
    blocks = -(-x.size // chunk)
    padded = np.zeros(blocks * chunk, dtype=np.float32)
    padded[: x.size] = np.abs(x)
    step = np.repeat(padded.reshape(blocks, chunk).max(axis=1) / c.levels(bits), chunk)[: x.size]
    assert np.all(np.abs(out - x) <= step * (1 + 1e-6))
    if chunk > 1:  # a chunk of one value is exact: its scale is |value| / L
        assert not np.array_equal(out, x)


def test_stochastic_rounding_is_unbiased() -> None:
    x = np.full(200_000, 0.3, dtype=np.float32)
    x[0] = 1.0  # scale 1/L per chunk of 256 that holds it; elsewhere 0.3/L
    out = c.decompress(c.compress(x, c.Scheme(bits=2), rng()), x.size)
    assert set(np.unique(out[256:])) <= {0.0, np.float32(0.3)}
    assert abs(float(out[256:].mean()) - 0.3) < 0.003  # floor rounding would give 0


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.3, 0.9])
def test_sparse_round_trip_is_exact_on_the_kept_entries(ratio: float) -> None:
    x = update()
    out = c.decompress(c.compress(x, c.Scheme(ratio=ratio), rng()), x.size)
    k = int(np.ceil(ratio * x.size))
    kept = np.flatnonzero(out)
    assert kept.size == k
    np.testing.assert_array_equal(out[kept], x[kept])
    assert np.abs(x[kept]).min() >= np.abs(np.delete(x, kept)).max()  # the largest ones


def test_dense_float32_round_trip_is_exact() -> None:
    x = update()
    np.testing.assert_array_equal(c.decompress(c.compress(x, c.Scheme(), rng()), x.size), x)


def test_indices_take_the_smaller_of_varints_and_bitmap() -> None:
    n = 100_000
    sparse = np.array([5, 17, 99_999])
    kind, data = c.encode_indices(sparse, n)
    assert kind == c.INDEX_VARINT and data.size == 1 + 1 + 3
    dense = np.arange(0, n, 2)
    kind, data = c.encode_indices(dense, n)
    assert kind == c.INDEX_BITMAP and data.size == n // 8
    for idx in (sparse, dense):
        kind, data = c.encode_indices(idx, n)
        np.testing.assert_array_equal(c.decode_indices(kind, data, n, idx.size), idx)


def test_varints_round_trip_at_every_length() -> None:
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**32, 2**62, 2**64 - 1], dtype=np.uint64)
    data = c.encode_varints(values)
    assert data.size == 1 + 1 + 1 + 2 + 2 + 3 + 5 + 9 + 10
    np.testing.assert_array_equal(c.decode_varints(data, values.size), values)


def test_a_varint_over_64_bits_is_malformed() -> None:
    with pytest.raises(Rejected) as err:
        c.decode_varints(np.array([0xFF] * 9 + [0x02], dtype=np.uint8), 1)
    assert err.value.reason == "malformed"


def test_top_k_payload_is_small() -> None:
    x = update(1_000_000)
    payload = c.compress(x, c.Scheme(ratio=0.01, bits=8), rng())
    assert 4 * x.size / len(payload) > 150  # 10k values at 1 byte + ~1.5 bytes of index each


def test_error_feedback_sends_everything_eventually() -> None:
    """sum(sent) + residual == sum(true updates) after every round (up to float32 rounding)."""
    scheme = c.Scheme(ratio=0.01, bits=4)
    ef = c.ErrorFeedback.zeros(5000)
    g = rng()
    true_sum = np.zeros(5000, dtype=np.float64)
    sent_sum = np.zeros(5000, dtype=np.float64)
    for r in range(60):
        u = update(5000, seed=r)
        payload, residual = ef.step(u, scheme, g)
        ef.residual = residual
        true_sum += u
        sent_sum += c.decompress(payload, 5000)
        np.testing.assert_allclose(sent_sum + ef.residual, true_sum, atol=1e-3)
    assert np.abs(ef.residual).max() > 0  # something was held back


def test_apply_delta_keeps_non_float_tensors_of_the_base() -> None:
    base = {"w": torch.ones(3, 2), "n": torch.tensor(4), "b": torch.zeros(2, dtype=torch.float64)}
    names = c.float_names(base)
    assert names == ["w", "b"]
    new = {"w": torch.full((3, 2), 2.0), "n": torch.tensor(9), "b": torch.ones(2, dtype=torch.float64)}
    out = c.apply_delta(base, c.model_delta(new, base, names), names)
    assert torch.equal(out["w"], new["w"]) and torch.equal(out["b"], new["b"])
    assert out["b"].dtype == torch.float64 and out["n"] is base["n"]


# ------------------------------------------------------------------------------ hostile payloads


def _payload(x: np.ndarray, scheme: c.Scheme) -> bytearray:
    return bytearray(c.compress(x, scheme, rng()))


def _reheader(p: bytearray, **fields: int) -> bytearray:
    magic, bits, kind, n, k, chunk, ib, _crc = c._HEADER.unpack_from(p)
    vals = dict(bits=bits, kind=kind, n=n, k=k, chunk=chunk, ib=ib)
    vals.update(fields)
    body = bytes(p[c._HEADER.size :])
    return bytearray(c._HEADER.pack(magic, vals["bits"], vals["kind"], vals["n"], vals["k"], vals["chunk"],
                                    vals["ib"], c.checksum(body)) + body)


def _rebody(p: bytearray, body: bytes) -> bytearray:
    magic, bits, kind, n, k, chunk, ib, _crc = c._HEADER.unpack_from(p)
    return bytearray(c._HEADER.pack(magic, bits, kind, n, k, chunk, ib, c.checksum(body)) + body)


def _varint_payload(indices: list[int], n: int = 1000) -> bytearray:
    """A valid-looking float32 sparse payload with the given raw indices (delta-encoded)."""
    deltas = np.diff(np.array(indices, dtype=np.int64), prepend=0)
    idx = c.encode_varints(deltas.view(np.uint64))  # a decreasing index can only be sent as a wrapped delta
    body = idx.tobytes() + np.ones(len(indices), dtype="<f4").tobytes()
    header = c._HEADER.pack(c.MAGIC, 32, c.INDEX_VARINT, n, len(indices), 256, idx.size, c.checksum(body))
    return bytearray(header + body)


HOSTILE = {
    "index out of range": ("index_out_of_range", lambda: _varint_payload([3, 10, 1000])),
    "repeated index": ("unsorted_indices", lambda: _varint_payload([3, 3, 7])),
    "unsorted indices": ("unsorted_indices", lambda: _varint_payload([5, 2, 7])),
    "wrong value count": ("wrong_count", lambda: _reheader(_payload(update(1000), c.Scheme(ratio=0.1)), k=99)),
    "more values than the vector": ("wrong_count", lambda: _reheader(_payload(update(1000), c.Scheme()), k=1001)),
    "wrong vector length": ("wrong_count", lambda: _reheader(_payload(update(999), c.Scheme()), n=999)),
    "truncated": ("truncated", lambda: _payload(update(1000), c.Scheme(ratio=0.1, bits=8))[:-5]),
    "truncated header": ("truncated", lambda: _payload(update(1000), c.Scheme())[:20]),
    "trailing bytes": ("wrong_count", lambda: _payload(update(1000), c.Scheme(bits=4)) + b"\0"),
    "bit width not in the spec": ("unsupported_bits", lambda: _reheader(_payload(update(1000), c.Scheme(bits=8)),
                                                                         bits=3)),
    "flipped byte": ("checksum_mismatch", lambda: _flip(_payload(update(1000), c.Scheme(ratio=0.1, bits=8)))),
    "bad magic": ("malformed", lambda: bytearray(b"XXXX") + _payload(update(1000), c.Scheme())[4:]),
    "bitmap past the end": ("index_out_of_range", lambda: _bitmap_past_end()),
    "NaN value": ("non_finite", lambda: _rebody(_payload(update(1000), c.Scheme()),
                                                np.full(1000, np.nan, dtype="<f4").tobytes())),
    "Inf scale": ("non_finite", lambda: _inf_scale()),
    "quantised value outside its levels": ("malformed", lambda: _big_level()),
}


def _flip(p: bytearray) -> bytearray:
    p[-3] ^= 0x40
    return p


def _bitmap_past_end() -> bytearray:
    n = 12
    bits = np.zeros(16, dtype=bool)
    bits[[1, 2, 14]] = True
    body = np.packbits(bits, bitorder="little").tobytes() + np.ones(3, dtype="<f4").tobytes()
    return bytearray(c._HEADER.pack(c.MAGIC, 32, c.INDEX_BITMAP, n, 3, 256, 2, c.checksum(body)) + body)


def _inf_scale() -> bytearray:
    p = _payload(update(512), c.Scheme(bits=8))
    body = bytearray(p[c._HEADER.size :])
    body[0:4] = struct.pack("<f", float("inf"))
    return _rebody(p, bytes(body))


def _big_level() -> bytearray:
    p = _payload(update(512), c.Scheme(bits=4))
    body = bytearray(p[c._HEADER.size :])
    body[-1] = 0xFF  # 15 in a 4-bit slot: levels go up to 14
    return _rebody(p, bytes(body))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_malformed_payloads_are_rejected_with_their_reason(case: str) -> None:
    reason, make = HOSTILE[case]
    payload = make()
    n = c._HEADER.unpack_from(payload)[3] if len(payload) >= c._HEADER.size else 1000
    with pytest.raises(Rejected) as err:
        c.decompress(bytes(payload), 1000 if case == "wrong vector length" else n)
    assert err.value.reason == reason, err.value.detail
    assert reason in c.REASONS


def test_scheme_refuses_what_the_format_cannot_carry() -> None:
    with pytest.raises(ValueError, match="bits"):
        c.Scheme(bits=16)
    with pytest.raises(ValueError, match="ratio"):
        c.Scheme(ratio=0.0)


def test_every_codec_reason_is_a_rejection_reason() -> None:
    from federator.runtime.transport import REJECTION_REASONS

    assert set(c.REASONS) <= set(REJECTION_REASONS)


# ------------------------------------------------------------------------------ downlink


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g), "n": torch.tensor(seed)}


def test_downlink_delta_applied_to_the_held_version_is_the_server_model_within_one_step() -> None:
    held = model(0)
    target = {k: v + 0.01 * model(1)[k] if v.is_floating_point() else v for k, v in held.items()}
    step = c.downlink_step(held, target, c.Scheme(bits=4, chunk=64), rng())
    on_worker = c.decode_update(step.payload, held)  # what a worker holding `held` computes
    assert all(torch.equal(on_worker[k], step.held[k]) for k in held)  # bit for bit the server's copy
    delta = c.model_delta(target, held, ["w", "b"])
    bound = np.abs(delta).max() / c.levels(4)
    for k in ("w", "b"):
        assert float((step.held[k] - target[k]).abs().max()) <= bound * (1 + 1e-5)
    assert len(step.payload) < 0.2 * 4 * delta.size


def test_downlink_error_does_not_accumulate_over_rounds() -> None:
    from federator.api.models import DownlinkCompressionSpec
    from federator.runtime.downlink import Downlink

    target = model(0)
    link = Downlink(DownlinkCompressionSpec(bits=2), target, version=1, chunk_bytes=1 << 20)
    for r in range(2, 40):
        target = {k: v + 0.05 * model(r)[k] if v.is_floating_point() else v for k, v in target.items()}
        prev = link.held
        link.commit(link.prepare(target, version=r))
        offer = link.offer(have_version=r - 1)
        assert offer.compressed and offer.delta_base == r - 1 and offer.encoded is not None
        step_bound = float(np.abs(c.model_delta(target, prev, ["w", "b"])).max()) / c.levels(2)
        assert float((link.held["w"] - target["w"]).abs().max()) <= step_bound * (1 + 1e-5)
    assert link.offer(have_version=39).encoded is None  # holds the current one
    full = link.offer(have_version=7)  # too far behind: the full (held) model
    assert not full.compressed and full.encoded is link.full


def test_uncompressed_downlink_sends_the_global_model_itself() -> None:
    from federator.api.models import DownlinkCompressionSpec
    from federator.runtime.downlink import Downlink

    link = Downlink(DownlinkCompressionSpec(), model(0), version=1, chunk_bytes=1 << 20)
    nxt = model(1)
    link.commit(link.prepare(nxt, version=2))
    assert link.held is nxt
    offer = link.offer(have_version=1)
    assert not offer.compressed and offer.encoded is link.full


def test_uplink_round_trip_through_encode_and_decode_update() -> None:
    base, trained = model(0), model(1)
    payload, residual = c.encode_update(trained, base, c.Scheme(ratio=0.05, bits=8), np.zeros(1230, np.float32),
                                        rng())
    assert residual is not None
    out = c.decode_update(payload, base)
    delta = c.model_delta(trained, base, ["w", "b"])
    np.testing.assert_allclose(c.model_delta(out, base, ["w", "b"]) + residual, delta, atol=1e-5)
    assert torch.equal(out["n"], base["n"])


def test_validation_refuses_error_feedback_without_loss() -> None:
    from pydantic import ValidationError

    from federator.api.models import UplinkCompressionSpec

    with pytest.raises(ValidationError, match="errorFeedback needs a lossy uplink"):
        UplinkCompressionSpec(errorFeedback=True)
    assert UplinkCompressionSpec(topK=0.01, errorFeedback=True).enabled
    with pytest.raises(ValidationError):
        UplinkCompressionSpec(bits=16)  # type: ignore[arg-type]


@pytest.mark.parametrize("n,ratio", [(200_000, 0.01), (200_000, 0.3), (70_000, 0.0001), (100, 0.05)])
def test_top_k_is_exact_on_large_vectors(n: int, ratio: float) -> None:
    x = update(n, seed=3)
    x[:50] = 0.0  # ties at the bottom
    idx = c.top_k(x, ratio)
    k = int(np.ceil(ratio * n))
    assert idx.size == k and np.all(np.diff(idx) > 0)
    expected = np.sort(np.abs(x))[-k:]
    np.testing.assert_array_equal(np.sort(np.abs(x[idx])), expected)


def test_top_k_is_exact_when_the_sample_misjudges() -> None:
    x = np.zeros(100_000, dtype=np.float32)
    x[-300:] = np.arange(1, 301)  # the sample (almost surely) sees only zeros: threshold 0 keeps everything
    idx = c.top_k(x, 0.001)
    np.testing.assert_array_equal(idx, np.arange(100_000 - 100, 100_000))


def test_a_worker_applies_a_checked_delta_to_its_one_copy_or_asks_for_the_full_model() -> None:
    from federator.api.models import Federation
    from federator.runtime.client import Worker
    from federator.runtime.proto import federator_pb2 as pb
    from tests.helpers.manifests import manifest

    worker = Worker(Federation.model_validate(manifest(compression={"downlink": {"bits": 8}})), "127.0.0.1:1", "t")
    try:
        held, target = model(0), model(1)
        step = c.downlink_step(held, target, c.Scheme(bits=8), rng())
        header = pb.TaskHeader(kind=pb.TaskHeader.TRAIN, version=8, weights_included=True, compressed=True,
                               delta_base=7)
        worker._cached = (7, held)
        got = worker._global_model(header, c.payload_tensors(step.payload))
        assert got is not None and all(torch.equal(got[k], step.held[k]) for k in held)

        worker._cached = (6, held)  # holds another version: the delta does not apply
        assert worker._global_model(header, c.payload_tensors(step.payload)) is None
        assert worker._cached is None  # so the next request asks for the full model

        worker._cached = (7, held)
        bad = bytearray(step.payload)
        bad[-1] ^= 0xFF
        assert worker._global_model(header, c.payload_tensors(bytes(bad))) is None  # checksum
        assert worker._cached is None
    finally:
        worker.close()
