"""A client worker: joins the server, pulls training tasks, trains locally with PyTorch, streams updates back.

A worker of simulated clients takes a batch of tasks of one round at a time (its fair share, at most
BATCH_TASKS, the model downloaded once) and trains them one after another, uploading each update while it
trains the next; a silo client (`--silo NAME --data PATH`) trains only its own data. Both survive a server
restart: every RPC failure leads back to joining again, with exponential backoff.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from federator.api.models import Federation
from federator.runtime import compression as comp
from federator.runtime import lifeline
from federator.runtime.aggregation.attacks import ClientAttack, local_data
from federator.runtime.config import load_federation_config
from federator.runtime.data import ArrayDataset, FederatedData, load_silo_data, prepare_data
from federator.runtime.httpserver import StatusHTTPServer
from federator.runtime.metrics import ClientMetrics
from federator.runtime.models import build_model
from federator.runtime.normalization import Normalizer, feature_stats, normalizer_from_proto, stats_to_proto
from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.proto import federator_pb2_grpc as pb_grpc
from federator.runtime.residuals import ResidualStore
from federator.runtime.training import Params, get_params, set_params, train_local, warm_up
from federator.runtime.transport import (
    RECONNECT_BACKOFF_MAX,
    BlobAssembler,
    Encoded,
    Rejected,
    encode,
    layout_from_specs,
    read_chunk,
    serialize_message,
)
from federator.tokens import read_client_token

log = logging.getLogger("federator.client")

MiB = 1 << 20
BATCH_TASKS = 16  # the most tasks a worker asks for at once (the server gives at most its fair share)
# updates trained but not yet uploaded a worker may keep, beyond the one in flight (a small model's
# whole batch; one update of a model over 64 MiB)
UPLOAD_BUFFER_BYTES = 64 * MiB
# an upload refused for one of these reasons ends the batch: the worker, its round or its model is gone
ENDS_BATCH = frozenset({"unknown_worker", "bad_token", "wrong_round", "stale_version"})


class Rejoin(Exception):
    """The server no longer knows this worker (it restarted, or dropped us): join again."""


@dataclass
class Prepared:
    """A trained update, ready to upload."""

    client_id: str
    round: int
    header: pb.UpdateHeader
    encoded: Encoded
    residual: np.ndarray | None


@dataclass
class Joined:
    worker_id: str
    heartbeat_seconds: float
    chunk_bytes: int
    input_shape: tuple[int, ...]
    num_classes: int


def grpc_channel_options(max_message_mib: int) -> list[tuple[str, int]]:
    size = max_message_mib * MiB
    # gRPC's own reconnect backoff grows to 120 s by default, and while it waits every call fails at once
    # with UNAVAILABLE: a worker would sit out a restarted server's remaining rounds. Cap it like ours.
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(RECONNECT_BACKOFF_MAX * 1000))]


class ModelCalls:
    """The two calls that move models, with chunks as raw frames instead of protobuf objects (see
    transport.chunk_frame): GetTask yields serialized TaskMessages, SubmitUpdate takes serialized or
    protobuf UpdateMessages. The other calls go through the generated stub."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.get_task = channel.unary_stream(
            "/federator.v1.Federator/GetTask", request_serializer=pb.TaskRequest.SerializeToString,
            response_deserializer=None, _registered_method=True)
        self.submit = channel.stream_unary(
            "/federator.v1.Federator/SubmitUpdate", request_serializer=serialize_message,
            response_deserializer=pb.SubmitReply.FromString, _registered_method=True)


def receive_model(header: pb.TaskHeader, frames: Iterator[bytes]) -> Params:
    """Assemble and check the global model that follows a TRAIN header with weights_included."""
    asm = BlobAssembler(header.tensors, header.total_bytes, layout_from_specs(header.tensors))
    for raw in frames:
        asm.add(read_chunk(raw, pb.TaskMessage))
    return asm.finish()


class Worker:
    """Serves training tasks until the server says the federation is over."""

    def __init__(self, fed: Federation, server: str, token: str, name: str | None = None,
                 silo: str | None = None, silo_data: ArrayDataset | None = None,
                 metrics: ClientMetrics | None = None, reconnect_seconds: float = 600.0,
                 tls_ca: bytes | None = None, tls_server_name: str | None = None,
                 residual_dir: Path | None = None, batch_tasks: int = BATCH_TASKS) -> None:
        self.fed = fed
        self.spec = fed.spec
        self.server = server
        self.token = token
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.silo = silo
        self.silo_data = silo_data
        self.metrics = metrics or ClientMetrics.create()
        self.reconnect_seconds = reconnect_seconds
        self._data: FederatedData | None = None
        self._model: torch.nn.Module | None = None
        self._cached: tuple[int, Params] | None = None  # (version, global params): one copy for every client
        up = self.spec.compression.uplink
        self.uplink = comp.Scheme(ratio=up.topK, bits=up.bits, chunk=up.chunk) if up.enabled else None
        self.residuals = ResidualStore(residual_dir, fed.metadata.name) if up.errorFeedback else None
        self.attack = ClientAttack(self.spec, residual_dir, fed.metadata.name)  # byzantine.attack: experiments only
        self._normalized: tuple[Normalizer, ArrayDataset] | None = None  # the local data, normalised
        self._task_id = ""
        self._revoked: set[str] = set()  # tasks of the current batch the server gave to an idle worker
        self._stop = threading.Event()
        self.tasks_done = 0
        self.batch_tasks = max(1, batch_tasks)
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
        options: list[tuple[str, Any]] = list(grpc_channel_options(self.spec.server.maxMessageMiB))
        if tls_ca is not None:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
            self._channel = grpc.secure_channel(server, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(server, options=options)
        self._stub = pb_grpc.FederatorStub(self._channel)
        self._calls = ModelCalls(self._channel)

    def close(self) -> None:
        self._stop.set()
        self._uploader.shutdown(wait=True)  # no upload may be in flight when the channel closes
        self._channel.close()

    # ------------------------------------------------------------------------------------ main loop

    def warm_up(self) -> None:
        """Load the data and take one training step before joining, so round 1 does not wait for either."""
        if self.silo_data is None:
            self._data = prepare_data(self.spec)
        warm_up(self.spec.training)

    def run(self) -> int:
        """Returns 0 when the server said STOP, 1 when it stayed unreachable for reconnect_seconds."""
        self.warm_up()
        self._await_listening()
        backoff, down_since = 0.1, None
        while not self._stop.is_set():
            try:
                joined = self._join()
                backoff, down_since = 0.1, None
                if self._serve(joined):
                    return 0
            except Rejoin as exc:
                log.info("rejoining: %s", exc)
                continue
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    log.error("the server refused this client's token: %s", exc.details() if hasattr(exc, "details")
                              else exc)
                    return 2
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.reconnect_seconds:
                    log.error("server %s unreachable for %.0fs; giving up", self.server, self.reconnect_seconds)
                    return 1
                log.info("server %s unavailable (%s); retrying in %.1fs", self.server, code, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX)
        return 1

    def _await_listening(self, poll: float = 0.05) -> None:
        """Before the first call: wait until the server accepts TCP connections, probing every `poll` s.

        A worker usually starts together with its server. A gRPC call made before the server listens puts
        the channel into its reconnect backoff, and the worker would join up to a backoff period late.
        """
        host, _, port = self.server.rpartition(":")
        address = (host.strip("[]"), int(port)) if port.isdigit() else None
        deadline = time.monotonic() + self.reconnect_seconds
        while address is not None and not self._stop.is_set() and time.monotonic() < deadline:
            try:
                with socket.create_connection(address, timeout=1.0):
                    return
            except OSError:
                self._stop.wait(poll)

    def _join(self) -> Joined:
        samples = len(self.silo_data) if self.silo_data is not None else 0
        # a silo's statistics (not its rows) let the server fix data.normalize before round 1
        stats = stats_to_proto(feature_stats(self.silo_data.x)) if self.silo_data is not None else None
        reply = self._stub.Join(pb.JoinRequest(token=self.token, worker_name=self.name, silo=self.silo or "",
                                               silo_samples=samples, feature_stats=stats), timeout=10)
        log.info("joined %s as %s", reply.federation, reply.worker_id)
        return Joined(reply.worker_id, float(reply.heartbeat_seconds or 1), int(reply.chunk_bytes or MiB),
                      tuple(reply.input_shape), int(reply.num_classes))

    def _serve(self, joined: Joined) -> bool:
        """Pull and run tasks until STOP (True) or until the server forgets us (raises Rejoin)."""
        beat_stop = threading.Event()
        forgotten = threading.Event()
        beater = threading.Thread(target=self._heartbeat, args=(joined, beat_stop, forgotten), daemon=True)
        beater.start()
        try:
            while not self._stop.is_set():
                if forgotten.is_set():
                    raise Rejoin("the server forgot this worker")
                have = self._cached[0] if self._cached else 0
                try:
                    header, params = self._get_task(joined, have)
                except grpc.RpcError as exc:
                    if hasattr(exc, "code") and exc.code() == grpc.StatusCode.NOT_FOUND:
                        raise Rejoin(str(exc.details())) from None
                    raise
                if header.kind == pb.TaskHeader.STOP:
                    log.info("federation finished (%s)", header.reason)
                    self._leave(joined)
                    return True
                if header.kind == pb.TaskHeader.NONE:
                    continue
                self._run_batch(joined, header, params, forgotten)
            return False
        finally:
            beat_stop.set()
            beater.join(10)  # no gRPC call may be in flight when the channel closes

    def _heartbeat(self, joined: Joined, stop: threading.Event, forgotten: threading.Event) -> None:
        while not stop.wait(joined.heartbeat_seconds):
            try:
                reply = self._stub.Heartbeat(pb.HeartbeatRequest(token=self.token, worker_id=joined.worker_id,
                                                                 task_id=self._task_id), timeout=5)
                if not reply.known:
                    forgotten.set()
                    return
                self._revoked.update(reply.revoked)
            except grpc.RpcError:
                continue  # the main loop notices an unreachable server on its own calls

    def _get_task(self, joined: Joined, have_version: int) -> tuple[pb.TaskHeader, Params | None]:
        stream = self._calls.get_task(pb.TaskRequest(token=self.token, worker_id=joined.worker_id,
                                                     have_version=have_version, wait_seconds=5.0,
                                                     max_tasks=self.batch_tasks), timeout=60)
        header = pb.TaskMessage.FromString(next(stream)).header
        if header.kind != pb.TaskHeader.TRAIN or not header.weights_included:
            for _ in stream:
                pass
            return header, None
        params = self._global_model(header, receive_model(header, stream))
        if params is None:
            return header, None
        self._cached = (header.version, params)
        return header, params

    def _global_model(self, header: pb.TaskHeader, received: Params) -> Params | None:
        """The global model a download describes: itself, or for a compressed delta the held copy plus the
        checked delta. None (and the held copy dropped, so the next request asks for the full model) when
        the delta does not fit what this worker holds or fails its checks."""
        if not header.compressed:
            return received
        held = self._cached
        try:
            if held is None or held[0] != header.delta_base:
                raise Rejected("stale_version", "a delta from a version this worker does not hold")
            return comp.decode_chain(received, held[1])  # the steps from the held version, oldest first
        except Rejected as exc:
            log.warning("global model delta unusable (%s); asking for the full model", exc)
            self._cached = None
            return None

    def _local_data(self, client_id: str, normalizer: Normalizer | None = None) -> ArrayDataset:
        """This task's training data, normalised as the server said (the whole local set once per run)."""
        if self.silo_data is not None:
            base = self.silo_data
        else:
            if self._data is None:
                self._data = prepare_data(self.spec)
            base = self._data.train
        if normalizer is not None:
            if self._normalized is None or not normalizer.same_as(self._normalized[0]):
                self._normalized = (normalizer, normalizer.apply(base))
            base = self._normalized[1]
        if self.silo_data is not None:
            return base
        assert self._data is not None
        i = int(client_id.removeprefix("sim-"))
        if not 0 <= i < self._data.num_clients:
            raise IndexError(f"client {i} out of range: there are {self._data.num_clients} clients")
        # byzantine.attack (experiments only): a label-flip attacker trains on poisoned labels
        return local_data(self.spec, client_id, base.subset(self._data.partitions[i]))

    def _build(self, joined: Joined) -> torch.nn.Module:
        if self._model is None:
            self._model = build_model(self.spec.model, joined.input_shape, joined.num_classes, seed=self.spec.data.seed)
        return self._model

    def _run_batch(self, joined: Joined, header: pb.TaskHeader, params: Params | None,
                   forgotten: threading.Event) -> None:
        """Train the header's task and its batch's `more`, in order; each update is uploaded (one thread,
        in order) while the next ones train, with at most UPLOAD_BUFFER_BYTES of updates waiting. Stops
        early when the worker is stopped or forgotten, or a refusal says the rest is useless; the tasks
        not uploaded are given up by the next GetTask."""
        if params is None:
            if self._cached is None or self._cached[0] != header.version:
                self._cached = None  # the server thought we had it: ask again with the weights
                return
            params = self._cached[1]
        self._revoked.clear()
        batch = [(header.task_id, header.client_id)] + [(m.task_id, m.client_id) for m in header.more]
        waiting: deque[tuple[Prepared, Future[pb.SubmitReply]]] = deque()
        go_on = True
        try:
            for task_id, client_id in batch:
                if self._stop.is_set() or forgotten.is_set() or not go_on:
                    break
                if task_id in self._revoked:
                    continue
                prepared = self._run_task(joined, header, task_id, client_id, params)
                # settle what has come back; wait only while the buffer is over its bound
                while waiting and (waiting[0][1].done() or
                                   sum(p.encoded.total_bytes for p, _ in waiting) > UPLOAD_BUFFER_BYTES):
                    done, fut = waiting.popleft()
                    go_on = self._settle(done, fut.result()) and go_on
                if go_on:
                    waiting.append((prepared, self._uploader.submit(self._upload, prepared)))
        finally:
            self._task_id = ""
            while waiting:
                done, fut = waiting.popleft()
                if not go_on:
                    fut.cancel()  # not started yet: never sent
                if not fut.cancelled():
                    go_on = self._settle(done, fut.result()) and go_on

    def _run_task(self, joined: Joined, header: pb.TaskHeader, task_id: str, client_id: str,
                  params: Params) -> Prepared:
        """Train one client of the batch from the global model `params`; returns its encoded update."""
        self._task_id = task_id
        model = self._build(joined)
        set_params(model, params)
        normalizer = normalizer_from_proto(header.normalization) if header.HasField("normalization") else None
        data = self._local_data(client_id, normalizer)
        seed = zlib.crc32(f"{self.spec.data.seed}:{header.round}:{client_id}".encode())
        result = train_local(model, data, self.spec.training, seed=seed,
                             global_params=params if self.spec.training.proximalMu > 0 else None)
        self.metrics.train_seconds.labels(client=client_id).observe(result.seconds)
        self.metrics.samples.labels(client=client_id).inc(result.num_samples)
        trained = self.attack.apply(client_id, header.round, get_params(model), params)
        residual = None
        if self.uplink is None:
            enc = encode(trained, joined.chunk_bytes)
        else:
            n = comp.float_count(params)
            before = self.residuals.get(client_id, n) if self.residuals is not None else None
            payload, residual = comp.encode_update(trained, params, self.uplink, before,
                                                   np.random.default_rng(seed))
            enc = encode(comp.payload_tensors(payload), joined.chunk_bytes)
        update_header = pb.UpdateHeader(
            token=self.token, worker_id=joined.worker_id, task_id=task_id, round=header.round,
            client_id=client_id, base_version=header.version, num_samples=result.num_samples,
            train_loss=result.loss, train_seconds=result.seconds, tensors=list(enc.specs),
            total_bytes=enc.total_bytes, compressed=self.uplink is not None,
        )
        return Prepared(client_id, header.round, update_header, enc, residual)

    def _upload(self, prepared: Prepared) -> pb.SubmitReply:
        def messages() -> Iterator[pb.UpdateMessage | bytes]:
            yield pb.UpdateMessage(header=prepared.header)
            yield from prepared.encoded.frames()

        # written aside before the upload, made the client's residual by a rename once the server took the
        # update (only what the server took moves it on), before the client's next task can be handed out
        staged = self.residuals.stage(prepared.client_id, prepared.residual) if (
            self.residuals is not None and prepared.residual is not None) else None
        try:
            reply: pb.SubmitReply = self._calls.submit(messages(), timeout=600)
        except BaseException:
            if staged is not None:
                staged.discard()
            raise
        if staged is not None and reply.accepted:
            staged.commit()
        elif staged is not None:
            staged.discard()
        return reply

    def _settle(self, prepared: Prepared, reply: pb.SubmitReply) -> bool:
        """Book an upload's reply (its residual is already settled by `_upload`); False when the rest of the
        batch is useless."""
        self._revoked.update(reply.revoked)
        outcome = "accepted" if reply.accepted else "rejected"
        self.metrics.tasks.labels(outcome=outcome).inc()
        self.tasks_done += 1
        if reply.accepted:
            return True
        if reply.reason == "reassigned":
            log.info("update for %s round %d not needed: %s", prepared.client_id, prepared.round, reply.detail)
            return True
        log.warning("update for %s round %d not accepted: %s %s", prepared.client_id, prepared.round,
                    reply.reason, reply.detail)
        return reply.reason not in ENDS_BATCH

    def _leave(self, joined: Joined) -> None:
        with contextlib.suppress(grpc.RpcError):
            self._stub.Leave(pb.LeaveRequest(token=self.token, worker_id=joined.worker_id), timeout=2)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    lifeline.watch_parent()  # started by `federator run`: end with it
    fed = load_federation_config(args.config)
    token = read_client_token(args.token_file)
    if not token:
        log.error("no token: pass --token-file or set FEDERATOR_TOKEN")
        return 2
    silo_data = None
    if args.silo:
        if not args.data:
            log.error("--silo needs --data: the path of this silo's own data")
            return 2
        d = fed.spec.data
        silo_data = load_silo_data(args.data, args.format, d.labelColumn, d.imageSize, d.grayscale)
    metrics = ClientMetrics.create()
    http = None
    if args.metrics_port >= 0:
        http = StatusHTTPServer("0.0.0.0" if args.metrics_port else "127.0.0.1", args.metrics_port,
                                metrics.registry).start()
    worker = Worker(fed, args.server, token, name=args.name, silo=args.silo, silo_data=silo_data,
                    metrics=metrics, reconnect_seconds=float(os.environ.get("FEDERATOR_RECONNECT_SECONDS", "600")),
                    tls_ca=Path(args.tls_ca).read_bytes() if args.tls_ca else None,
                    tls_server_name=args.tls_server_name,
                    residual_dir=Path(os.environ["FEDERATOR_RESIDUAL_DIR"]) if os.environ.get("FEDERATOR_RESIDUAL_DIR")
                    else None)
    terminated = threading.Event()

    def _on_sigterm(signum: int, _frame: object) -> None:
        log.info("%s: leaving after the current call", signal.Signals(signum).name)
        terminated.set()
        worker._stop.set()

    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    try:
        code = worker.run()
        return 143 if terminated.is_set() else code
    except KeyboardInterrupt:
        return 130
    finally:
        worker.close()
        if http is not None:
            http.stop()


