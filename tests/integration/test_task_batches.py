"""Batched tasks over real gRPC: a worker takes its fair share of a round at once, and whatever happens to it
(dropped silent, leaving mid-batch, straggling, the round timing out) every task is trained and counted
once. A hand-driven worker breaks the rules; the other worker is the real one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from federator.api.models import Federation
from federator.runtime.client import Worker
from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.proto import federator_pb2_grpc as pb_grpc
from federator.runtime.server import FederationServer
from federator.runtime.training import Params
from federator.runtime.transport import BlobAssembler, encode, layout_from_specs
from tests.helpers.inprocess import run_in_process
from tests.helpers.manifests import manifest
from tests.helpers.waiting import wait_for

TOKEN = "t"


class Manual:
    """A worker speaking the protocol by hand: takes a batch, uploads (the model it got) when told."""

    def __init__(self, port: int, name: str = "manual") -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.FederatorStub(self.channel)
        self.worker_id = self.stub.Join(pb.JoinRequest(token=TOKEN, worker_name=name), timeout=30).worker_id
        self.header = pb.TaskHeader()
        self.params: Params = {}
        self._beating = threading.Event()

    def take(self, max_tasks: int) -> list[tuple[str, str]]:
        """(task_id, client_id) of the batch it was given, waiting for a round to open."""
        for _ in range(30):
            msgs = list(self.stub.GetTask(pb.TaskRequest(token=TOKEN, worker_id=self.worker_id, wait_seconds=2,
                                                         max_tasks=max_tasks), timeout=30))
            h = msgs[0].header
            if h.kind == pb.TaskHeader.TRAIN:
                asm = BlobAssembler(h.tensors, h.total_bytes, layout_from_specs(h.tensors))
                for m in msgs[1:]:
                    asm.add(m.chunk)
                self.header, self.params = h, asm.finish()
                return [(h.task_id, h.client_id)] + [(m.task_id, m.client_id) for m in h.more]
        raise AssertionError("no task offered")

    def upload(self, task: tuple[str, str]) -> pb.SubmitReply:
        enc = encode(self.params)
        header = pb.UpdateHeader(token=TOKEN, worker_id=self.worker_id, task_id=task[0], round=self.header.round,
                                 client_id=task[1], base_version=self.header.version, num_samples=1,
                                 train_seconds=0.001, tensors=list(enc.specs), total_bytes=enc.total_bytes)
        msgs = [pb.UpdateMessage(header=header), *[pb.UpdateMessage(chunk=c) for c in enc.chunks(1 << 20)]]
        reply: pb.SubmitReply = self.stub.SubmitUpdate(iter(msgs), timeout=30)
        return reply

    def beat(self) -> pb.HeartbeatReply:
        reply: pb.HeartbeatReply = self.stub.Heartbeat(pb.HeartbeatRequest(token=TOKEN, worker_id=self.worker_id),
                                                       timeout=10)
        return reply

    def keep_beating(self, every: float) -> None:
        def loop() -> None:
            while not self._beating.wait(every):
                try:
                    self.beat()
                except grpc.RpcError:
                    return
        threading.Thread(target=loop, daemon=True).start()

    def stop_beating(self) -> None:
        self._beating.set()

    def leave(self) -> None:
        self.stub.Leave(pb.LeaveRequest(token=TOKEN, worker_id=self.worker_id), timeout=10)

    def close(self) -> None:
        self.stop_beating()
        self.channel.close()


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Any]:
    """start(doc) -> (server, its round-loop thread); everything is stopped at the end."""
    made: list[tuple[FederationServer, threading.Thread]] = []
    closers: list[Any] = []

    def start(doc: dict[str, Any]) -> tuple[FederationServer, threading.Thread]:
        # heartbeats every 0.2 s: a silent worker is dropped after 3 * 0.2 + 2 s
        server = FederationServer(Federation.model_validate(doc), tmp_path, [TOKEN], heartbeat_seconds=0.2).start()
        thread = threading.Thread(target=server.run, daemon=True)
        made.append((server, thread))
        return server, thread

    yield start, closers
    for c in closers:
        c.close()
    for server, thread in made:
        server.stop(grace=0)
        thread.join(30)


def real_worker(server: FederationServer, closers: list[Any]) -> tuple[Worker, threading.Thread]:
    w = Worker(server.fed, f"127.0.0.1:{server.port}", TOKEN, name="real")
    closers.append(w)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    return w, t


def updates(server: FederationServer, outcome: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "federator_client_updates_total", {"federation": "test", "namespace": "default", "outcome": outcome})
    return value or 0.0


def rejected_total(server: FederationServer) -> float:
    return sum(s.value for m in server.metrics.registry.collect() if m.name == "federator_update_rejections"
               for s in m.samples if s.name.endswith("_total"))


TEN = {"count": 10, "perRound": 10, "minPerRound": 10, "roundTimeoutSeconds": 120}


def test_a_batch_is_the_fair_share_and_an_old_style_request_still_gets_one_task(federation: Any) -> None:
    start, closers = federation
    server, thread = start(manifest(rounds=1, clients=TEN))
    a, b, old = Manual(server.port, "a"), Manual(server.port, "b"), Manual(server.port, "old")
    closers += [a, b, old]
    thread.start()
    first = a.take(max_tasks=16)
    assert len(first) == 4  # ceil(10 open tasks / 3 workers)
    assert a.header.weights_included and len(set(first)) == 4
    one = old.take(max_tasks=0)  # a worker of the previous protocol: one task, no `more`
    assert len(one) == 1 and len(old.header.more) == 0
    second = b.take(max_tasks=16)
    assert len(second) == 4  # the open tasks still count a's and old's
    assert not set(first) & set(second) and not set(one) & (set(first) | set(second))
    for w, batch in ((a, first), (b, second), (old, one)):
        for task in batch:
            assert w.upload(task).accepted
    rest = a.take(max_tasks=16)
    assert len(rest) == 1  # 1 task left open
    assert a.upload(rest[0]).accepted
    thread.join(60)
    assert server.completed == 1 and server.history[0]["participants"] == 10
    assert updates(server, "accepted") == 10 and rejected_total(server) == 0


@pytest.mark.parametrize("how", ["goes_silent", "leaves"])
def test_a_worker_lost_mid_batch_hands_back_its_tasks_and_the_round_completes(federation: Any, how: str) -> None:
    start, closers = federation
    server, thread = start(manifest(rounds=1, clients=TEN))
    lost = Manual(server.port, "lost")
    closers.append(lost)
    thread.start()
    batch = lost.take(max_tasks=5)
    assert len(batch) == 5
    lost.keep_beating(0.2)
    for task in batch[:2]:
        assert lost.upload(task).accepted
    real, real_thread = real_worker(server, closers)
    if how == "leaves":
        lost.leave()  # its 3 tasks go back at once
    else:
        wait_for(lambda: real.tasks_done >= 5, 120, "the real worker's own batch")
        lost.stop_beating()  # dropped after 2.6 s of silence; its tasks go back then
    thread.join(120)
    assert server.completed == 1 and server.history[0]["participants"] == 10
    assert lost.worker_id not in server.workers
    assert updates(server, "accepted") == 10 and rejected_total(server) == 0
    # the real worker trained everything the lost one did not upload, each task once
    assert real.metrics.registry.get_sample_value("federator_client_tasks_total", {"outcome": "accepted"}) == 8
    real_thread.join(60)


def test_a_straggler_keeps_two_tasks_and_an_idle_worker_trains_the_rest(federation: Any) -> None:
    start, closers = federation
    server, thread = start(manifest(rounds=1, clients=TEN))
    slow = Manual(server.port, "slow")
    closers.append(slow)
    thread.start()
    batch = slow.take(max_tasks=5)
    slow.keep_beating(0.2)
    _, real_thread = real_worker(server, closers)

    def moved() -> set[str] | None:
        got = set(slow.beat().revoked)
        return got if len(got) == 3 else None

    # the real worker trains its own 5, then takes the straggler's last tasks while it holds 3 or more
    revoked = wait_for(moved, 120, "three of the straggler's tasks moved")
    assert revoked == {t for t, _ in batch[2:]}
    late = slow.upload(batch[-1])  # it trains one of them anyway: refused, counted late, not as an error
    assert not late.accepted and late.reason == "reassigned" and set(late.revoked) == revoked
    for task in batch[:2]:
        assert slow.upload(task).accepted
    thread.join(120)
    assert server.completed == 1 and server.history[0]["participants"] == 10
    assert updates(server, "accepted") == 10 and updates(server, "late") == 1 and rejected_total(server) == 0
    real_thread.join(60)


def test_a_round_timing_out_with_a_batch_held_closes_with_what_arrived(federation: Any) -> None:
    start, closers = federation
    # one attempt: the round closes at its timeout with what arrived, or the federation fails
    clients = {**TEN, "minPerRound": 8, "roundTimeoutSeconds": 15, "maxRoundRetries": 0}
    server, thread = start(manifest(rounds=1, clients=clients))
    _, real_thread = real_worker(server, closers)  # joined and warm before the round (and its clock) starts
    wait_for(lambda: server.long_polls == 1, 120, "the real worker waiting for a task")
    holder = Manual(server.port, "holder")
    closers.append(holder)
    holder.keep_beating(0.2)  # alive, but never uploads in time
    thread.start()
    batch = holder.take(max_tasks=5)
    thread.join(120)
    assert server.phase == "Succeeded", server.message
    assert server.completed == 1 and server.history[0]["participants"] == 8  # its own 5 and 3 moved to it
    reply = holder.upload(batch[0])
    assert not reply.accepted and reply.reason == "wrong_round"
    assert updates(server, "accepted") == 8
    real_thread.join(60)


def test_batched_and_one_task_at_a_time_give_the_same_model(tmp_path: Path) -> None:
    doc = manifest(rounds=2, clients={"count": 6, "perRound": 6, "minPerRound": 6})

    def one_at_a_time(fed: Federation, address: str, i: int) -> Worker:
        return Worker(fed, address, TOKEN, name=f"w{i}", batch_tasks=1)

    batched, [bw] = run_in_process(doc, tmp_path / "batched", workers=1)
    single, [sw] = run_in_process(doc, tmp_path / "single", workers=1, make_worker=one_at_a_time)
    assert bw.tasks_done == sw.tasks_done == 12
    assert [r["accuracy"] for r in batched.history] == [r["accuracy"] for r in single.history]
    assert all(torch.equal(batched.params[k], single.params[k]) for k in batched.params)
