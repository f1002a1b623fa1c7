"""A hostile client over real gRPC: every bad update is rejected with its reason, counted, and never
reaches the model; the server keeps working and the next honest update is aggregated exactly."""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from federator.api.models import Federation
from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.proto import federator_pb2_grpc as pb_grpc
from federator.runtime.server import FederationServer
from federator.runtime.training import Params
from federator.runtime.transport import BlobAssembler, encode, layout_from_specs
from federator.tokens import Tokens
from tests.helpers.manifests import manifest

TOKEN = "good-token"
MiB = 1 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FederationServer]:
    doc = manifest(
        rounds=5,
        model={"name": "tests.helpers.bigmodel:ballast", "args": {"megabytes": 3}},
        clients={"count": 1, "perRound": 1, "minPerRound": 1, "roundTimeoutSeconds": 60, "maxRoundRetries": 50},
        server={"maxMessageMiB": 1},
    )
    tokens = Tokens((TOKEN,), {"hospital-a": "silo-token"})
    srv = FederationServer(Federation.model_validate(doc), tmp_path, tokens).start()
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(10)


class Hostile:
    """Speaks the protocol by hand so that it can break every rule."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.FederatorStub(self.channel)
        self.worker_id = self.stub.Join(pb.JoinRequest(token=TOKEN, worker_name="hostile")).worker_id

    def task(self) -> tuple[pb.TaskHeader, Params]:
        for _ in range(50):
            stream = self.stub.GetTask(pb.TaskRequest(token=TOKEN, worker_id=self.worker_id, wait_seconds=2))
            msgs = list(stream)
            header = msgs[0].header
            if header.kind == pb.TaskHeader.TRAIN:
                asm = BlobAssembler(header.tensors, header.total_bytes, layout_from_specs(header.tensors))
                for m in msgs[1:]:
                    asm.add(m.chunk)
                return header, asm.finish()
        raise AssertionError("no task offered")

    def submit(self, messages: list[pb.UpdateMessage]) -> pb.SubmitReply:
        reply: pb.SubmitReply = self.stub.SubmitUpdate(iter(messages), timeout=30)
        return reply

    def update(self, task: pb.TaskHeader, params: Params, chunk_bytes: int = 256 * 1024,
               **overrides: object) -> tuple[pb.UpdateHeader, list[pb.Chunk]]:
        enc = encode(params)
        fields: dict[str, object] = dict(
            token=TOKEN, worker_id=self.worker_id, task_id=task.task_id, round=task.round,
            client_id=task.client_id, base_version=task.version, num_samples=100, train_seconds=0.01,
            tensors=list(enc.specs), total_bytes=enc.total_bytes,
        )
        fields.update(overrides)
        return pb.UpdateHeader(**fields), list(enc.chunks(chunk_bytes))  # type: ignore[arg-type]


def messages(header: pb.UpdateHeader, chunks: list[pb.Chunk]) -> list[pb.UpdateMessage]:
    return [pb.UpdateMessage(header=header), *[pb.UpdateMessage(chunk=c) for c in chunks]]


def shifted(params: Params, by: float) -> Params:
    return {k: v + by if v.is_floating_point() else v.clone() for k, v in params.items()}


def rejections(srv: FederationServer, reason: str) -> float:
    value = srv.metrics.registry.get_sample_value(
        "federator_update_rejections_total", {"federation": "test", "namespace": "default", "reason": reason})
    return value or 0.0


# Each case builds a bad update from an honest one: (expected reason, tamper(header, chunks, params, client))
Case = Callable[[Hostile, pb.TaskHeader, Params], list[pb.UpdateMessage]]


def _corrupt_chunk(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    header, chunks = h.update(t, shifted(p, 1.0))
    data = bytearray(chunks[1].data)
    data[10] ^= 0xFF  # flipped in flight; the chunk's crc32 still describes the original bytes
    chunks[1] = pb.Chunk(offset=chunks[1].offset, data=bytes(data), crc32=chunks[1].crc32)
    return messages(header, chunks)


def _checksum_mismatch(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    header, chunks = h.update(t, shifted(p, 1.0))
    header.tensors[0].crc32 ^= 0x1  # every chunk intact, the tensor's declared checksum wrong
    return messages(header, chunks)


def _wrong_shape(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    bad = dict(p)
    first = next(iter(bad))
    bad[first] = bad[first].unsqueeze(0)
    header, chunks = h.update(t, bad)
    return messages(header, chunks)


def _wrong_dtype(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    bad = {k: v.double() for k, v in p.items()}
    header, chunks = h.update(t, bad)
    return messages(header, chunks)


def _nan(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    bad = shifted(p, 1.0)
    key = next(k for k, v in bad.items() if v.is_floating_point())
    bad[key].view(-1)[0] = float("nan")
    header, chunks = h.update(t, bad)
    return messages(header, chunks)


def _inf(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    bad = shifted(p, 1.0)
    key = next(k for k, v in bad.items() if v.is_floating_point())
    bad[key].view(-1)[-1] = float("inf")
    header, chunks = h.update(t, bad)
    return messages(header, chunks)


def _wrong_round(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    header, chunks = h.update(t, shifted(p, 1.0), round=t.round + 7)
    return messages(header, chunks)


def _oversized_message(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    # 1.5 MiB messages: above spec.server.maxMessageMiB (1), though the model has 3 MB
    header, chunks = h.update(t, shifted(p, 1.0), chunk_bytes=3 * MiB // 2)
    return messages(header, chunks)


def _oversized_declared(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    header, chunks = h.update(t, shifted(p, 1.0))
    header.total_bytes += 4 * MiB
    return messages(header, chunks)


def _bad_token(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    header, chunks = h.update(t, shifted(p, 1.0), token="stolen")
    return messages(header, chunks)


def _missing_chunks(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    header, chunks = h.update(t, shifted(p, 1.0))
    return messages(header, chunks[:-1])


def _stale_version(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    header, chunks = h.update(t, shifted(p, 1.0), base_version=t.version + 1)
    return messages(header, chunks)


def _inflated_samples(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    header, chunks = h.update(t, shifted(p, 1.0), num_samples=10**9)  # would dominate a weighted average
    return messages(header, chunks)


def _header_missing(h: Hostile, t: pb.TaskHeader, p: Params) -> list[pb.UpdateMessage]:
    _, chunks = h.update(t, shifted(p, 1.0))
    return [pb.UpdateMessage(chunk=c) for c in chunks]


CASES: dict[str, tuple[str, Case]] = {
    "corrupt chunk": ("corrupt_chunk", _corrupt_chunk),
    "checksum mismatch": ("checksum_mismatch", _checksum_mismatch),
    "wrong shape": ("wrong_shape", _wrong_shape),
    "wrong dtype": ("wrong_dtype", _wrong_dtype),
    "NaN": ("non_finite", _nan),
    "Inf": ("non_finite", _inf),
    "wrong round": ("wrong_round", _wrong_round),
    "oversized message": ("oversized", _oversized_message),
    "oversized declaration": ("oversized", _oversized_declared),
    "wrong token": ("bad_token", _bad_token),
    "missing chunks": ("missing_chunks", _missing_chunks),
    "stale model version": ("stale_version", _stale_version),
    "inflated sample count": ("malformed", _inflated_samples),
    "no header": ("malformed", _header_missing),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_update_is_rejected_and_never_reaches_the_model(server: FederationServer, case: str) -> None:
    reason, make = CASES[case]
    before = {k: v.clone() for k, v in server.params.items()}
    client = Hostile(server.port)
    task, params = client.task()

    reply = client.submit(make(client, task, params))

    assert not reply.accepted
    assert reply.reason == reason, reply.detail
    assert rejections(server, reason) == 1
    assert server.completed == 0
    assert all(torch.equal(before[k], server.params[k]) for k in before)

    # the server lives on: the (requeued) task is offered again and an honest update is aggregated exactly
    task, params = client.task()
    honest = shifted(params, 0.5)
    good = client.submit(messages(*client.update(task, honest)))
    assert good.accepted, good.detail
    deadline = time.monotonic() + 30
    while server.completed < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.completed == 1
    assert all(torch.equal(server.params[k], honest[k]) for k in honest)  # FedAvg of one update is the update


def test_message_above_grpc_hard_limit_aborts_the_upload_only(server: FederationServer) -> None:
    before = {k: v.clone() for k, v in server.params.items()}
    client = Hostile(server.port)
    task, params = client.task()
    header, chunks = client.update(task, shifted(params, 1.0), chunk_bytes=3 * MiB)  # one 3 MiB message
    with pytest.raises(grpc.RpcError) as err:
        client.submit(messages(header, chunks))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # gRPC ends the server's side of the stream either with an error ("aborted") or, racing with the
    # client's half-close, as if the client had stopped sending ("missing_chunks"): one rejection either way
    deadline = time.monotonic() + 10
    while rejections(server, "aborted") + rejections(server, "missing_chunks") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rejections(server, "aborted") + rejections(server, "missing_chunks") == 1
    assert all(torch.equal(before[k], server.params[k]) for k in before)
    task, params = client.task()  # requeued, and the server still serves
    assert client.submit(messages(*client.update(task, shifted(params, 0.5)))).accepted


def test_unknown_token_cannot_join(server: FederationServer) -> None:
    stub = pb_grpc.FederatorStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Join(pb.JoinRequest(token="guess", worker_name="intruder"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:  # a silo's token belongs to that silo only
        stub.Join(pb.JoinRequest(token="silo-token", worker_name="intruder", silo="hospital-b"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rejections(server, "bad_token") == 2
    assert server.workers == {}


def test_crc_of_honest_chunks_is_checked_per_chunk() -> None:
    """The wire format itself (guards the tamper cases above): a chunk's crc32 runs over its tensor's bytes
    up to the chunk's end, so flipping a byte breaks that chunk's check, and the last one is the tensor's."""
    enc = encode({"w": torch.arange(10_000, dtype=torch.float32)})
    chunks = list(enc.chunks(4096))
    assert len(chunks) == 10
    running = 0
    for c in chunks:
        running = zlib.crc32(c.data, running)
        assert c.crc32 == running
    assert chunks[-1].crc32 == enc.specs[0].crc32
    assert b"".join(c.data for c in chunks) == enc.blob


def test_a_replayed_update_is_refused_and_its_reply_says_it_is_a_replay(tmp_path: Path) -> None:
    doc = manifest(rounds=1, clients={"count": 2, "perRound": 2, "minPerRound": 2, "roundTimeoutSeconds": 60})
    srv = FederationServer(Federation.model_validate(doc), tmp_path, [TOKEN]).start()
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        client = Hostile(srv.port)
        task, params = client.task()
        update = messages(*client.update(task, shifted(params, 0.5)))
        assert client.submit(update).accepted  # one of two: the round stays open
        replay = client.submit(update)
        assert not replay.accepted and replay.reason == "duplicate"
        assert "replay" in replay.detail and "not assigned" not in replay.detail
        assert rejections(srv, "duplicate") == 1
    finally:
        srv.stop()
        thread.join(10)
