"""Compressed updates over real gRPC with an in-process server and real workers: accuracy and measured
ratio on digits, bytes counted on both ends, hostile payloads, a robust rule and restarts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from federator.api.models import Federation
from federator.runtime import compression as c
from federator.runtime.checkpoint import load_checkpoint
from federator.runtime.client import ModelCalls, Worker
from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.residuals import ResidualStore
from federator.runtime.server import CHECKPOINT_FILE, FederationServer
from federator.runtime.training import Params
from federator.runtime.transport import encode, serialize_message
from tests.helpers.inprocess import TOKEN as SERVER_TOKEN
from tests.helpers.inprocess import run_in_process
from tests.helpers.manifests import manifest
from tests.integration.test_hostile_updates import TOKEN, Hostile, rejections

TOP1_8BIT_EF = {"uplink": {"topK": 0.01, "bits": 8, "errorFeedback": True}}


class CountingCalls:
    """The worker's model calls, counting the serialized size of every message on this end of the wire."""

    def __init__(self, inner: ModelCalls) -> None:
        self.inner = inner
        self.received = 0
        self.sent = 0

    def get_task(self, request: pb.TaskRequest, timeout: float) -> Iterator[bytes]:
        for raw in self.inner.get_task(request, timeout=timeout):
            self.received += len(raw)
            yield raw

    def submit(self, messages: Iterator[Any], timeout: float) -> pb.SubmitReply:
        def counted() -> Iterator[bytes]:
            for m in messages:
                raw = serialize_message(m)
                self.sent += len(raw)
                yield raw

        reply: pb.SubmitReply = self.inner.submit(counted(), timeout=timeout)
        return reply


def run_federation(state: Path, doc: dict[str, Any], residuals: Path, workers: int = 2,
                   ) -> tuple[FederationServer, list[Worker], list[CountingCalls]]:
    counters: list[CountingCalls] = []

    def counting_worker(fed: Federation, address: str, i: int) -> Worker:
        w = Worker(fed, address, SERVER_TOKEN, name=f"w{i}", residual_dir=residuals)
        counters.append(CountingCalls(w._calls))
        w._calls = counters[-1]  # type: ignore[assignment]
        return w

    server, ws = run_in_process(doc, state, workers, join_seconds=60, make_worker=counting_worker)
    return server, ws, counters


def digits(rounds: int, **spec: Any) -> dict[str, Any]:
    return manifest(rounds=rounds, model={"name": "mlp", "hiddenSizes": [128]},
                    training={"learningRate": 0.1, "momentum": 0.9},
                    clients={"count": 4, "perRound": 4, "minPerRound": 4, "workers": 2}, **spec)


def metric(server: FederationServer, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, {"federation": "test", "namespace": "default", **labels})
    assert value is not None, name
    return value


def test_top1_8bit_error_feedback_matches_uncompressed_accuracy_at_over_50x(tmp_path: Path) -> None:
    rounds = 40
    plain, _, plain_calls = run_federation(tmp_path / "plain", digits(rounds), tmp_path / "r0")
    small, _, calls = run_federation(tmp_path / "small", digits(rounds, compression=TOP1_8BIT_EF), tmp_path / "r1")
    assert plain.phase == small.phase == "Succeeded"
    assert len(small.history) == len(plain.history) == rounds
    assert small.history[-1]["accuracy"] >= plain.history[-1]["accuracy"] - 0.01, (
        plain.history[-1]["accuracy"], small.history[-1]["accuracy"])

    # the ratio as measured on the wire: what the same messages would have been uncompressed over their size
    ratio = small.traffic.ratio_of("uplink")
    assert ratio >= 50, ratio
    assert small.traffic.wire["uplink"] * 50 <= plain.traffic.wire["uplink"]  # same rounds, same clients
    assert plain.traffic.ratio_of("uplink") == 1.0
    assert small.status()["compressionRatio"] == pytest.approx(ratio, abs=1e-3)
    assert metric(small, "federator_compression_ratio", direction="uplink") == pytest.approx(ratio)
    assert small.metrics_document()["compression"]["ratio"]["uplink"] == pytest.approx(ratio, abs=1e-3)

    # bytes the metrics count are the bytes of the gRPC messages the workers sent and received
    for server, counters in ((plain, plain_calls), (small, calls)):
        assert metric(server, "federator_bytes_received_total") == sum(x.sent for x in counters)
        assert metric(server, "federator_bytes_sent_total") == sum(x.received for x in counters)
        assert server.traffic.wire["uplink"] == sum(x.sent for x in counters)
    assert sum(r["bytes_received"] for r in small.history) <= small.traffic.wire["uplink"]


def test_compression_with_a_robust_rule_survives_server_and_worker_restarts(tmp_path: Path) -> None:
    """Median over decoded updates; the server is stopped after round 3 and resumed, the workers are new
    processes' worth of objects: residuals come back from the folder, the held model from the checkpoint."""
    spec = {"compression": {**TOP1_8BIT_EF, "downlink": {"bits": 8}}, "aggregation": {"rule": "median"}}
    residuals = tmp_path / "residuals"
    first, _, _ = run_federation(tmp_path / "state", digits(3, **spec), residuals)
    assert first.phase == "Succeeded" and first.completed == 3
    saved = {p.name: np.load(p) for p in residuals.glob("*.npy")}
    assert len(saved) == 4 and all(np.abs(r).max() > 0 for r in saved.values())
    held = load_checkpoint(tmp_path / "state" / CHECKPOINT_FILE)["downlink_held"]  # what workers hold
    assert all(torch.equal(held[k], first.downlink.held[k]) for k in held)
    assert any(not torch.equal(held[k], first.params[k]) for k in held)  # 8-bit steps: not the exact model

    loaded: dict[str, np.ndarray] = {}
    original_get = ResidualStore.get

    def recording_get(self: ResidualStore, client_id: str, n: int) -> np.ndarray:
        got = original_get(self, client_id, n)
        loaded.setdefault(self._path(client_id).name, got.copy())
        return got

    ResidualStore.get = recording_get  # type: ignore[method-assign]
    try:
        second, _, _ = run_federation(tmp_path / "state", digits(8, **spec), residuals)
    finally:
        ResidualStore.get = original_get  # type: ignore[method-assign]
    assert second.resumed and second.phase == "Succeeded" and second.completed == 8
    assert [r["round"] for r in second.history] == list(range(1, 9))
    assert set(loaded) == set(saved)
    for name, residual in saved.items():  # each client continued exactly where it stopped
        np.testing.assert_array_equal(loaded[name], residual)
    assert second.history[-1]["accuracy"] > 0.6
    assert second.traffic.ratio_of("uplink") >= 50


# ------------------------------------------------------------------------------ hostile compressed payloads


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FederationServer]:
    doc = manifest(rounds=5, clients={"count": 1, "perRound": 1, "minPerRound": 1, "roundTimeoutSeconds": 60,
                                      "maxRoundRetries": 50},
                   compression={"uplink": {"topK": 0.1, "bits": 8}})
    srv = FederationServer(Federation.model_validate(doc), tmp_path, [TOKEN]).start()
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(10)


def compressed_update(h: Hostile, task: pb.TaskHeader, payload: bytes) -> list[pb.UpdateMessage]:
    enc = encode(c.payload_tensors(payload))
    header = pb.UpdateHeader(token=TOKEN, worker_id=h.worker_id, task_id=task.task_id, round=task.round,
                             client_id=task.client_id, base_version=task.version, num_samples=10,
                             tensors=list(enc.specs), total_bytes=enc.total_bytes, compressed=True)
    return [pb.UpdateMessage(header=header), *[pb.UpdateMessage(chunk=ch) for ch in enc.chunks(4096)]]


def honest_payload(params: Params) -> bytes:
    trained = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in params.items()}
    payload, _ = c.encode_update(trained, params, c.Scheme(ratio=0.1, bits=8), None, np.random.default_rng(0))
    return payload


def with_body(payload: bytes, body: bytes, **fields: int) -> bytes:
    magic, bits, kind, n, k, chunk, ib, _crc = c._HEADER.unpack_from(payload)
    v = {"bits": bits, "kind": kind, "n": n, "k": k, "chunk": chunk, "ib": ib, **fields}
    return c._HEADER.pack(magic, v["bits"], v["kind"], v["n"], v["k"], v["chunk"], v["ib"], c.checksum(body)) + body


def sparse(indices: list[int], n: int) -> bytes:
    """A float32 sparse payload with the given indices, delta-encoded as they come."""
    deltas = np.diff(np.array(indices, dtype=np.int64), prepend=0).view(np.uint64)
    idx = c.encode_varints(deltas)
    body = idx.tobytes() + np.full(len(indices), 0.5, dtype="<f4").tobytes()
    return c._HEADER.pack(c.MAGIC, 32, c.INDEX_VARINT, n, len(indices), 256, idx.size, c.checksum(body)) + body


def _body(p: bytes) -> bytes:
    return p[c._HEADER.size :]


HOSTILE: dict[str, tuple[str, Any]] = {
    "index out of range": ("index_out_of_range", lambda p, n: sparse([1, 5, n], n)),
    "repeated index": ("unsorted_indices", lambda p, n: sparse([1, 5, 5], n)),
    "unsorted indices": ("unsorted_indices", lambda p, n: sparse([9, 5, 12], n)),
    "wrong value count": ("wrong_count", lambda p, n: with_body(p, _body(p), k=c._HEADER.unpack_from(p)[4] - 1)),
    "truncated data": ("truncated", lambda p, n: with_body(p, _body(p)[:-7])),
    "bit width not in the spec": ("unsupported_bits", lambda p, n: with_body(p, _body(p), bits=6)),
    "checksum": ("checksum_mismatch", lambda p, n: p[:-1] + bytes([p[-1] ^ 1])),
    "wrong model size": ("wrong_count", lambda p, n: sparse([1, 2], n + 1)),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_compressed_update_is_rejected_and_the_model_is_unchanged(server: FederationServer,
                                                                          case: str) -> None:
    reason, make = HOSTILE[case]
    before = {k: v.clone() for k, v in server.params.items()}
    client = Hostile(server.port)
    task, params = client.task()
    n = c.float_count(params)

    reply = client.submit(compressed_update(client, task, make(honest_payload(params), n)))

    assert not reply.accepted
    assert reply.reason == reason, reply.detail
    assert rejections(server, reason) == 1
    assert server.completed == 0
    assert all(torch.equal(before[k], server.params[k]) for k in before)

    # the server lives on, and an honest compressed update becomes exactly base + its decoded delta
    task, params = client.task()
    payload = honest_payload(params)
    good = client.submit(compressed_update(client, task, payload))
    assert good.accepted, good.detail
    deadline = time.monotonic() + 30
    while server.completed < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.completed == 1
    expected = c.decode_update(payload, params)
    assert all(torch.equal(server.params[k], expected[k]) for k in expected)


def test_a_compressed_update_larger_than_any_valid_one_is_refused_before_it_is_read(
        server: FederationServer) -> None:
    client = Hostile(server.port)
    task, params = client.task()
    huge = b"\0" * (c.max_payload_bytes(c.float_count(params)) + 1)
    reply = client.submit(compressed_update(client, task, huge))
    assert not reply.accepted and reply.reason == "oversized"


def test_federator_run_keeps_residuals_in_the_run_folder_and_a_fresh_run_starts_them_anew(tmp_path: Path) -> None:
    """Real processes: the workers share <out>/residuals; a new run (no --resume) does not continue the
    previous run's residuals, which would add a stale update to every client's first one."""
    import json
    import subprocess
    import sys

    from tests.helpers.manifests import write_manifest

    out = tmp_path / "out"
    stale = out / "residuals" / "test--sim-0.npy"
    stale.parent.mkdir(parents=True)
    np.save(stale, np.full(9610, 1e6, dtype=np.float32))  # the right size: it would be used
    path = write_manifest(tmp_path / "fed.yaml", digits(2, compression=TOP1_8BIT_EF))
    done = subprocess.run([sys.executable, "-m", "federator", "run", str(path), "--out", str(out), "--quiet"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    residuals = {p.name: np.load(p) for p in (out / "residuals").glob("*.npy")}
    assert sorted(residuals) == [f"test--sim-{i}.npy" for i in range(4)]
    assert all(np.abs(r).max() < 1e3 for r in residuals.values())  # none continued the planted one
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["compression"]["ratio"]["uplink"] >= 50
    assert doc["rounds"][-1]["accuracy"] > 0.3
    assert (out / "bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ downlink history over gRPC


class Lagging:
    """A worker that names whichever version it likes in GetTask and rebuilds the model from what it gets."""

    def __init__(self, port: int) -> None:
        self.h = Hostile(port)
        self.copies: dict[int, Params] = {}  # version -> the model this worker rebuilt for it

    def task(self, have: int) -> tuple[pb.TaskHeader, Params]:
        from federator.runtime.client import receive_model

        for _ in range(100):
            stream = self.h.stub.GetTask(pb.TaskRequest(token=TOKEN, worker_id=self.h.worker_id, have_version=have,
                                                        wait_seconds=2))
            first = next(stream)
            header = pb.TaskMessage.FromString(first).header if isinstance(first, bytes) else first.header
            if header.kind != pb.TaskHeader.TRAIN:
                list(stream)
                continue
            frames = (m if isinstance(m, bytes) else m.SerializeToString() for m in stream)
            received = receive_model(header, frames)
            if header.compressed:
                assert header.delta_base == have
                params = c.decode_chain(received, self.copies[have])
            else:
                params = received
            self.copies[header.version] = params
            return header, params
        raise AssertionError("no task offered")

    def train(self, task: pb.TaskHeader, params: Params) -> None:
        from tests.integration.test_hostile_updates import messages, shifted

        reply = self.h.submit(messages(*self.h.update(task, shifted(params, 0.01))))
        assert reply.accepted, reply.detail


def test_a_worker_behind_gets_the_steps_it_missed_and_a_restarted_server_still_sends_them(tmp_path: Path) -> None:
    """Over real gRPC: a worker 1, 2 or 3 versions behind (history 3) gets that many 4-bit steps and ends at the
    server's held copy bit for bit; 4 behind gets the full model; after a server restart from the checkpoint
    the same holds."""
    doc = manifest(rounds=8, clients={"count": 1, "perRound": 1, "minPerRound": 1, "roundTimeoutSeconds": 60,
                                      "maxRoundRetries": 50},
                   compression={"downlink": {"bits": 4, "history": 3}})
    fed = Federation.model_validate(doc)

    def serve() -> tuple[FederationServer, threading.Thread]:
        srv = FederationServer(fed, tmp_path, [TOKEN]).start()
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        return srv, thread

    def one_round(srv: FederationServer, w: Lagging, have: int) -> pb.TaskHeader:
        done = srv.completed
        task, params = w.task(have)
        w.train(task, params)
        deadline = time.monotonic() + 60
        while srv.completed == done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.completed == done + 1
        return task

    def same(a: Params, b: Params) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    srv, thread = serve()
    try:
        w = Lagging(srv.port)
        versions = [one_round(srv, w, 0).version]  # new: the full model
        for _ in range(3):  # each round from the version before: one step each
            versions.append(one_round(srv, w, versions[-1]).version)
        assert srv.completed == 4
        for behind in (1, 2, 3):
            task, params = w.task(versions[-behind])
            assert task.compressed and task.delta_base == versions[-behind]
            assert same(params, srv.downlink.held)  # the server's copy, bit for bit
        task, params = w.task(versions[0])  # 4 behind: past history
        assert not task.compressed and same(params, srv.downlink.held)
        steps = load_checkpoint(tmp_path / CHECKPOINT_FILE)["downlink_steps"]
        assert len(steps) == 3 and steps[-1]["version"] == srv.version
    finally:
        srv.stop()
        thread.join(10)

    srv, thread = serve()  # a new server process' worth of state, from the checkpoint
    try:
        assert srv.resumed and srv.completed == 4
        w2 = Lagging(srv.port)
        w2.copies = w.copies
        for behind in (1, 2, 3):
            task, params = w2.task(versions[-behind])
            assert task.compressed and task.delta_base == versions[-behind], behind
            assert same(params, srv.downlink.held)
        one_round(srv, w2, versions[-3])  # trains from the rebuilt copy: its update is decoded against it
        assert srv.completed == 5
    finally:
        srv.stop()
        thread.join(10)
