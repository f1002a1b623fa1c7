"""The downlink's history: a worker up to `compression.downlink.history` versions behind gets the steps from
exactly the version it holds and ends at the server's copy bit for bit; further behind, or when the steps
would not be smaller, it gets the full model; the steps survive a checkpoint and a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from federator.api.models import DownlinkCompressionSpec
from federator.runtime import compression as c
from federator.runtime.checkpoint import load_checkpoint, save_checkpoint
from federator.runtime.client import receive_model
from federator.runtime.downlink import Downlink, Offer, Step, steps_from_state
from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.training import Params
from federator.runtime.transport import Rejected

CHUNK = 1 << 16  # several chunks per download


def model(seed: int) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(60, 50, generator=g), "b": torch.randn(50, generator=g), "n": torch.tensor(seed)}


def moved(p: Params, r: int) -> Params:
    return {k: v + 0.05 * model(r)[k] if v.is_floating_point() else v for k, v in p.items()}


def run(link: Downlink, rounds: int) -> tuple[dict[int, Params], dict[int, Params], list[float]]:
    """Commit `rounds` new global models (versions 2..); returns the held copy and the exact global model at
    every version, and each step's quantisation bound (max |delta| / levels)."""
    held, exact, bounds = {1: link.held}, {1: link.held}, []
    target = link.held
    for v in range(2, rounds + 2):
        target = moved(target, v)
        assert link.scheme is not None
        bounds.append(float(np.abs(c.model_delta(target, link.held, ["w", "b"])).max()) / c.levels(link.scheme.bits))
        link.commit(link.prepare(target, version=v))
        held[v], exact[v] = link.held, target
    return held, exact, bounds


def download(offer: Offer) -> Params:
    """What a worker receives for an offer, through the client's own assembly of the streamed frames."""
    assert offer.encoded is not None
    enc = offer.encoded
    header = pb.TaskHeader(kind=pb.TaskHeader.TRAIN, weights_included=True, tensors=list(enc.specs),
                           total_bytes=enc.total_bytes, compressed=offer.compressed, delta_base=offer.delta_base)
    return receive_model(header, enc.frames())


def same(a: Params, b: Params) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bits", [4, 2])
def test_a_worker_within_history_gets_the_steps_from_its_version_and_holds_the_servers_copy(bits: int) -> None:
    link = Downlink(DownlinkCompressionSpec(bits=bits, history=4), model(0), version=1, chunk_bytes=CHUNK)
    held, exact, bounds = run(link, 9)
    now = link.version
    one_step = None
    for k in range(1, 5):
        offer = link.offer(have_version=now - k)
        assert offer.compressed and offer.delta_base == now - k
        got = download(offer)
        assert list(got) == c.chain_names(k)
        worker = c.decode_chain(got, held[now - k])  # applied to exactly what that worker holds
        assert same(worker, link.held)  # bit for bit: its uplink is decoded against this copy
        for name in ("w", "b"):  # and the global model within the last step's quantisation bound
            assert float((worker[name] - exact[now][name]).abs().max()) <= bounds[-1] * (1 + 1e-5)
        assert torch.equal(worker["n"], held[now - k]["n"])  # non-float tensors are the held copy's
        assert offer.encoded is not None
        one_step = one_step or offer.encoded.total_bytes
        assert offer.encoded.total_bytes == pytest.approx(k * one_step, rel=0.01)  # k steps, k payloads
        assert offer.encoded.total_bytes < link.full.total_bytes
    assert link.offer(have_version=now - 1).encoded is link.offer(have_version=now - 1).encoded  # built once


def test_beyond_history_new_or_unknown_workers_get_the_full_model() -> None:
    link = Downlink(DownlinkCompressionSpec(bits=4, history=3), model(0), version=1, chunk_bytes=CHUNK)
    run(link, 6)
    now = link.version
    for have in (now - 4, now - 6, 0, 12345):  # 4 and 6 behind (history 3), a new worker, a version never made
        offer = link.offer(have_version=have)
        assert not offer.compressed and offer.encoded is link.full and offer.delta_base == 0
        assert same(download(offer), link.held)
    assert link.offer(have_version=now).encoded is None  # holds the current one
    assert 12345 not in link._chains and 0 not in link._chains  # a version a worker names is not kept


def test_steps_as_large_as_the_full_model_are_not_sent() -> None:
    """At 8 bits a step is a bit over a quarter of the model: 3 steps are sent, 4 would exceed it."""
    link = Downlink(DownlinkCompressionSpec(bits=8, history=8), model(0), version=1, chunk_bytes=CHUNK)
    run(link, 8)
    now = link.version
    sizes = [s.payload.numel() for s in link.steps]
    assert len(sizes) == 8
    for k in range(1, 9):
        offer = link.offer(have_version=now - k)
        assert offer.compressed == (sum(sizes[-k:]) < link.full.total_bytes)
    assert link.offer(have_version=now - 3).compressed and not link.offer(have_version=now - 4).compressed


def test_the_steps_survive_a_checkpoint_and_a_restart(tmp_path: Path) -> None:
    spec = DownlinkCompressionSpec(bits=4, history=3)
    link = Downlink(spec, model(0), version=1, chunk_bytes=CHUNK)
    held, _, _ = run(link, 5)
    target = moved(link.held, 99)
    pending = link.prepare(target, version=7)
    kept_held, kept_steps = link.state_after(pending)  # what the server checkpoints before it commits
    save_checkpoint(tmp_path / "c.pt", {"held": kept_held, "steps": kept_steps})
    link.commit(pending)
    held[7] = link.held

    state = load_checkpoint(tmp_path / "c.pt")
    restarted = Downlink(spec, state["held"], 7, CHUNK, steps_from_state(state["steps"], 7))
    assert same(restarted.held, link.held)
    assert [(s.base, s.version) for s in restarted.steps] == [(4, 5), (5, 6), (6, 7)]
    for k in (1, 2, 3):
        before, after = link.offer(have_version=7 - k), restarted.offer(have_version=7 - k)
        assert after.compressed and after.encoded is not None and before.encoded is not None
        assert after.encoded.blob == before.encoded.blob
        assert same(c.decode_chain(download(after), held[7 - k]), restarted.held)
    assert not restarted.offer(have_version=3).compressed

    shorter = Downlink(DownlinkCompressionSpec(bits=4, history=2), state["held"], 7, CHUNK,
                       steps_from_state(state["steps"], 7))  # history lowered between runs: the newest kept
    assert [(s.base, s.version) for s in shorter.steps] == [(5, 6), (6, 7)]


def test_checkpointed_steps_that_do_not_lead_to_the_current_version_are_dropped() -> None:
    p = torch.zeros(8, dtype=torch.uint8)
    chain = [Step(1, 2, p).to_state(), Step(2, 3, p).to_state()]
    assert [(s.base, s.version) for s in steps_from_state(chain, 3)] == [(1, 2), (2, 3)]
    assert steps_from_state(chain, 4) == []  # ends at another version
    assert steps_from_state([chain[0], Step(5, 3, p).to_state()], 3) == []  # a gap
    assert steps_from_state([{**chain[0], "payload": torch.zeros(8)}], 2) == []  # not bytes
    assert steps_from_state([{"base": 1}], 2) == []
    assert steps_from_state(None, 2) == [] and steps_from_state([], 2) == []


def test_a_malformed_chain_is_rejected_before_the_model_is_touched() -> None:
    held, target = model(0), model(1)
    step = c.downlink_step(held, target, c.Scheme(bits=8), np.random.default_rng(0))
    t = c.payload_tensors(step.payload)[c.COMPRESSED]
    cases = [
        {"compressed.1": t},  # not the first step's name
        {c.COMPRESSED: t, "compressed.2": t},  # a step missing
        dict(zip(c.chain_names(c.MAX_CHAIN + 1), [t] * (c.MAX_CHAIN + 1), strict=True)),  # too many
        {c.COMPRESSED: t.to(torch.int16)},  # not bytes
        {},
    ]
    for received in cases:
        with pytest.raises(Rejected) as exc:
            c.decode_chain(received, held)
        assert exc.value.reason == "malformed"
    bad = t.clone()
    bad[-1] ^= 0xFF
    with pytest.raises(Rejected) as exc:
        c.decode_chain({c.COMPRESSED: t, "compressed.1": bad}, held)  # the second step's checksum
    assert exc.value.reason == "checksum_mismatch"


def test_a_worker_applies_steps_from_the_version_it_holds() -> None:
    from federator.api.models import Federation
    from federator.runtime.client import Worker
    from tests.helpers.manifests import manifest

    link = Downlink(DownlinkCompressionSpec(bits=4, history=3), model(0), version=1, chunk_bytes=CHUNK)
    held, _, _ = run(link, 4)
    fed = Federation.model_validate(manifest(compression={"downlink": {"bits": 4, "history": 3}}))
    worker = Worker(fed, "127.0.0.1:1", "t")
    try:
        offer = link.offer(have_version=2)
        header = pb.TaskHeader(kind=pb.TaskHeader.TRAIN, version=link.version, weights_included=True,
                               compressed=True, delta_base=2)
        worker._cached = (2, held[2])
        got = worker._global_model(header, download(offer))
        assert got is not None and same(got, link.held)
        worker._cached = (3, held[3])  # holds another version than the steps start from
        assert worker._global_model(header, download(offer)) is None and worker._cached is None
    finally:
        worker.close()


def test_history_is_validated() -> None:
    from pydantic import ValidationError

    assert DownlinkCompressionSpec().history == 3
    for bad in (0, c.MAX_CHAIN + 1):
        with pytest.raises(ValidationError, match="history"):
            DownlinkCompressionSpec(bits=8, history=bad)
