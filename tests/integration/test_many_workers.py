"""Many connected workers: long-polling GetTask calls must not starve heartbeats (real gRPC on 127.0.0.1)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from federator.api.models import Federation
from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.proto import federator_pb2_grpc as pb_grpc
from federator.runtime.server import FederationServer
from tests.helpers.manifests import manifest

STREAMS = 250


def test_heartbeats_are_answered_while_250_long_polls_hold_their_threads(tmp_path: Path) -> None:
    server = FederationServer(Federation.model_validate(manifest()), tmp_path, ["t"]).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.FederatorStub(channel)
    calls = []
    try:
        # no round runs (server.run() is not called), so every GetTask waits its full 10 s long-poll
        ids = [stub.Join(pb.JoinRequest(token="t", worker_name=f"w{i}"), timeout=60).worker_id
               for i in range(STREAMS + 1)]
        calls = [stub.GetTask(pb.TaskRequest(token="t", worker_id=w, wait_seconds=10.0), timeout=60)
                 for w in ids[:STREAMS]]
        deadline = time.monotonic() + 60
        while server.long_polls < STREAMS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.long_polls == STREAMS, "the long-polls did not all reach the server"
        reply = stub.Heartbeat(pb.HeartbeatRequest(token="t", worker_id=ids[-1]), timeout=60)
        still_parked = server.long_polls
        assert reply.known
        # answered by a free thread while every long-poll still waited, not after one of them ended
        assert still_parked == STREAMS
        assert not any(c.done() for c in calls)
    finally:
        for c in calls:
            c.cancel()
        channel.close()
        server.stop(grace=0)


def test_a_worker_parked_in_get_task_is_not_reaped_for_missing_heartbeats(tmp_path: Path) -> None:
    server = FederationServer(Federation.model_validate(manifest()), tmp_path, ["t"]).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.FederatorStub(channel)
    call = None
    try:
        polling = stub.Join(pb.JoinRequest(token="t", worker_name="polling"), timeout=60).worker_id
        silent = stub.Join(pb.JoinRequest(token="t", worker_name="silent"), timeout=60).worker_id
        call = stub.GetTask(pb.TaskRequest(token="t", worker_id=polling, wait_seconds=10.0), timeout=60)
        deadline = time.monotonic() + 60
        while server.long_polls < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.long_polls == 1
        with server._cond:  # neither has been heard of for longer than the server allows
            for w in server.workers.values():
                w.last_seen = time.monotonic() - server.dead_after - 1.0
            server.dispatch._next_reap = 0.0
            server._reap_dead_workers()
            known = set(server.workers)
            parked = server.long_polls
        assert parked == 1
        assert polling in known and silent not in known
    finally:
        if call is not None:
            call.cancel()
        channel.close()
        server.stop(grace=0)
