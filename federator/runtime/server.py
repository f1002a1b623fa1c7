"""The federation server: samples clients, queues their training tasks, aggregates, evaluates, checkpoints.

Client workers pull tasks over gRPC (DESIGN section 4). One lock (`self._cond`) guards the round's
bookkeeping; decoding and validating an update happens outside it, so a large upload never blocks the
other workers. A round closes when every sampled update arrived, or at the round timeout with at least
`minPerRound`; otherwise it is retried, and after `maxRoundRetries` the federation fails with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from federator.api.manifest import ManifestError
from federator.api.models import Federation, FederationSpec
from federator.api.serverstatus import ServerStatus
from federator.runtime import compression as comp
from federator.runtime import lifeline
from federator.runtime.aggregation import (
    AggregationPipeline,
    AggregationState,
    RoundAggregator,
    RoundResult,
    ServerOptimizerState,
    server_update,
    state_from_dict,
    state_to_dict,
)
from federator.runtime.aggregation.attacks import describe as describe_attack
from federator.runtime.byzantine import ReputationState, is_quarantined
from federator.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from federator.runtime.config import load_federation_config
from federator.runtime.data import DataError, prepare_data
from federator.runtime.diagnostics import majority_rate, stuck_at_majority, stuck_message
from federator.runtime.downlink import Downlink, steps_from_state
from federator.runtime.httpserver import StatusHTTPServer
from federator.runtime.metrics import ServerMetrics
from federator.runtime.models import ModelError, build_model, count_parameters
from federator.runtime.normalization import (
    FeatureStats,
    Normalizer,
    combine_stats,
    feature_stats,
    normalizer_from_stats,
    normalizer_to_proto,
    resolve_mode,
    stats_from_proto,
)
from federator.runtime.proto import federator_pb2 as pb
from federator.runtime.proto import federator_pb2_grpc as pb_grpc
from federator.runtime.scheduler import Dispatcher, Task, TaskBook, WorkerInfo
from federator.runtime.statelock import StateDirLocked, lock_state_dir
from federator.runtime.traffic import DIRECTIONS, Traffic
from federator.runtime.training import Params, evaluate, get_params, set_params
from federator.runtime.transport import (
    DEFAULT_CHUNK_BYTES,
    RECONNECT_BACKOFF_MAX,
    BlobAssembler,
    Layout,
    Rejected,
    read_chunk,
    serialize_message,
)
from federator.tokens import Tokens, TokensError, read_server_tokens

log = logging.getLogger("federator.server")

CHECKPOINT_FILE = "checkpoint.pt"
# gRPC's thread-pool server holds one thread per open call, and every connected worker keeps a GetTask
# long-poll open: the pool must exceed the workers, or heartbeats queue behind long-polls and workers are
# dropped as dead. Threads start on demand, so an idle pool costs nothing (benchmarks/scale.py).
GRPC_THREADS = int(os.environ.get("FEDERATOR_GRPC_THREADS", "1100"))
MiB = 1 << 20
SERVICE = "federator.v1.Federator"


@dataclass
class RoundState:
    round: int
    attempt: int
    started: float
    tasks: dict[str, Task]
    aggregator: RoundAggregator
    accepted: int = 0
    train_seconds: dict[str, float] = field(default_factory=dict)  # worker -> summed local training time
    closed: bool = False


def sample_clients(spec: FederationSpec, rnd: int, attempt: int, silos: list[str],
                   reputation: ReputationState) -> list[tuple[str, str | None]]:
    """The (client, silo) pairs trained in a round: clients.perRound of the simulated clients and joined
    silos, seeded by data.seed, round and attempt. Quarantined clients are left out unless the round could
    not reach minPerRound without them."""
    pool: list[tuple[str, str | None]] = [(f"sim-{i}", None) for i in range(spec.clients.count)]
    pool += [(s, s) for s in silos]
    pool = list(dict.fromkeys(pool))
    free = [c for c in pool if not is_quarantined(reputation, c[0], rnd)]
    if len(free) >= spec.clients.min_per_round:
        pool = free
    elif len(free) < len(pool):
        log.warning("round %d: only %d clients are not quarantined (minPerRound=%d); sampling all",
                    rnd, len(free), spec.clients.min_per_round)
    k = min(spec.clients.per_round, len(pool))
    rng = np.random.default_rng([spec.data.seed, rnd, attempt])
    picked = rng.choice(len(pool), size=k, replace=False)
    return [pool[i] for i in sorted(picked)]


def model_version(run_id: str, completed_round: int) -> int:
    """A non-zero id of the global model after `completed_round` rounds of run `run_id`."""
    digest = hashlib.sha256(f"{run_id}:{completed_round}".encode()).digest()
    return int.from_bytes(digest[:7], "big") + 1


class FederationServer:
    """Owns the global model and the round loop; serves gRPC and HTTP."""

    def __init__(self, fed: Federation, state_dir: Path, tokens: Tokens | Sequence[str], host: str = "127.0.0.1",
                 port: int = 0, metrics_port: int = 0, heartbeat_seconds: float = 1.0,
                 tls: tuple[bytes, bytes] | None = None) -> None:
        self.fed = fed
        self.spec = fed.spec
        self.name = fed.metadata.name
        self.namespace = fed.metadata.namespace
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tokens = tokens if isinstance(tokens, Tokens) else Tokens.from_entries(tokens)
        self.worker_tokens, self.silo_tokens = list(tokens.workers), dict(tokens.silos)
        self.heartbeat_seconds = heartbeat_seconds
        self.dead_after = 3 * heartbeat_seconds + 2.0
        # our own limit is checked on every message and counted; gRPC's hard limit (twice ours) only stops
        # what would otherwise be allocated, and shows as an aborted stream
        self.max_message = self.spec.server.maxMessageMiB * MiB
        self.chunk_bytes = min(DEFAULT_CHUNK_BYTES, self.max_message // 2)
        max_msg = 2 * self.max_message + 64 * 1024

        self.data = prepare_data(self.spec)
        self.model = build_model(self.spec.model, self.data.train.input_shape, self.data.train.num_classes,
                                 seed=self.spec.data.seed)
        self.params: Params = get_params(self.model)
        self.layout = Layout.of(self.params)
        self.opt_state = ServerOptimizerState()
        # stages, rule and scoring; keeps its buffers from round to round, its state lives in agg_state
        self.pipeline = AggregationPipeline(self.spec, self.params)
        self.agg_state = AggregationState()
        self.history: list[dict[str, Any]] = []
        self.completed = 0
        self.resumed = False  # True when this process continued a run from its checkpoint
        self.run_id = secrets.token_hex(8)
        self.phase = "Pending"
        self.message = "waiting for client workers to join"  # until run() has them (/status is served before)
        self.warning = ""  # a training problem worth a user's attention (see diagnostics.py)
        self.normalize_mode = resolve_mode(self.spec.data)
        self.normalizer: Normalizer | None = None
        self._normalization_fixed = False  # from the checkpoint, or at the start of round 1
        self.eval_data = self.data.test
        self._norm_pb: pb.Normalization | None = None
        self._majority = majority_rate(self.data.test.y, self.data.num_classes)
        held, steps = self._resume()
        self.version = model_version(self.run_id, self.completed)
        # the model workers hold (the global one unless the downlink is compressed), and what to send them
        self.downlink = Downlink(self.spec.compression.downlink, held if held is not None else self.params,
                                 self.version, self.chunk_bytes, steps_from_state(steps, self.version))
        self.uplink = self.spec.compression.uplink

        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # round bookkeeping changed (updates, joins, drops)
        self._stopping = threading.Event()
        self.current: RoundState | None = None
        self.silo_stats: dict[str, dict[str, Any]] = {}
        self.silo_features: dict[str, FeatureStats] = {}  # silo -> its feature statistics (data.normalize)
        self.participants = 0

        self.metrics = ServerMetrics.create(self.name, self.namespace)
        lv = {"federation": self.name, "namespace": self.namespace}
        self._m = {k: getattr(self.metrics, k).labels(**lv) for k in (
            "round", "rounds_total", "round_duration", "accuracy", "loss", "clients_connected",
            "bytes_sent", "bytes_received", "pending_tasks")}
        self._lv = lv
        self.traffic = Traffic(self._m["bytes_sent"], self._m["bytes_received"],
                               {d: self.metrics.compression_ratio.labels(**lv, direction=d) for d in DIRECTIONS})
        self._series: set[str] = set()  # simulated clients with their own anomaly-score series
        # task queue and leases (scheduler.py); every call into them holds the lock
        self.book = TaskBook(on_pending=self._m["pending_tasks"].set, expected_workers=self.spec.clients.workers)
        self.dispatch = Dispatcher(self.book, lock, self._over, self.dead_after)
        self._m["round"].set(self.completed)
        if self.history:
            self._m["accuracy"].set(self.history[-1]["accuracy"])
            self._m["loss"].set(self.history[-1]["loss"])

        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=GRPC_THREADS, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", max_msg), ("grpc.max_send_message_length", max_msg)],
        )
        _add_servicer(_Servicer(self), self._grpc)
        if tls is not None:
            cert, key = tls
            self.port = self._grpc.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = self._grpc.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen for gRPC on {host}:{port}")
        self._http = StatusHTTPServer(host, metrics_port, self.metrics.registry, self.status,
                                      healthy=lambda: self.phase != "Failed")
        self.metrics_port = self._http.port

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        return self.book.workers

    @property
    def long_polls(self) -> int:
        return self.dispatch.long_polls

    def _over(self) -> bool:
        return self.phase in ("Succeeded", "Failed") or self._stopping.is_set()

    # ------------------------------------------------------------------------------------ lifecycle

    def _resume(self) -> tuple[Params | None, Any]:
        """Continue from the checkpoint if there is one; returns the model the workers held (compressed
        downlink) when it was saved, and the downlink steps kept then."""
        state = load_checkpoint(self.state_dir / CHECKPOINT_FILE)
        if state is None:
            return None, None
        saved_layout = [tuple(x) for x in state["layout"]]
        mine = [(t.name, t.dtype, list(t.shape)) for t in self.layout.tensors]
        if saved_layout != [tuple(x) for x in mine]:
            raise RuntimeError(
                f"checkpoint {self.state_dir / CHECKPOINT_FILE} was made for a different model; "
                "use a new state directory (--state-dir / --out) or delete the checkpoint to start over"
            )
        self.params = {k: v.clone() for k, v in state["params"].items()}
        self.opt_state = state_from_dict(state["optimizer"])  # validated: step, and names -> tensors
        self.agg_state = AggregationState.from_dict(state.get("aggregation") or {})
        self.history = [dict(h) for h in state["history"]]
        self.completed = int(state["completed_round"])
        self.run_id = str(state["run_id"])
        if state.get("normalization"):
            self._set_normalizer(Normalizer.from_state(state["normalization"]))
        else:  # trained without normalisation (or before data.normalize existed): keep it that way
            if "normalization" not in state and self.normalize_mode != "none":
                log.warning("checkpoint predates data.normalize: resuming without normalisation")
            self._set_normalizer(None)
        self.resumed = True
        log.info("resumed from checkpoint: %d of %d rounds completed", self.completed, self.spec.rounds)
        held = state.get("downlink_held")
        return ({k: v.clone() for k, v in held.items()} if held is not None else None), state.get("downlink_steps")

    def start(self) -> FederationServer:
        self._grpc.start()
        self._http.start()
        log.info("federation %s: gRPC on port %d, HTTP on port %d, model %s with %d parameters",
                 self.name, self.port, self.metrics_port, self.spec.model.name, count_parameters(self.model))
        if self.pipeline.attackers:
            log.warning("%s", describe_attack(self.spec, sorted(self.pipeline.attackers)))
        return self

    def stop(self, grace: float = 1.0) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
            self.dispatch.wake()
        self._grpc.stop(grace).wait()
        self._http.stop()

    # ------------------------------------------------------------------------------------ round loop

    def run(self) -> int:
        """Run the remaining rounds. Returns 0 on success, 1 when the federation failed or was stopped."""
        try:
            if self.completed >= self.spec.rounds:
                self.phase = "Succeeded"
                self._finish()
                return 0
            if not self._wait_for_clients():
                return 1
            if not self._normalization_fixed:
                self._fix_normalization()
            self.phase = "Running"
            self.message = ""  # "waiting for client workers" no longer holds: a later failure sets its own
            while self.completed < self.spec.rounds and not self._stopping.is_set():
                if not self._run_round_with_retries(self.completed + 1):
                    return 1
            if self._stopping.is_set():
                return 1
            self.phase = "Succeeded"
            self._finish()
            return 0
        finally:
            with self._cond:
                self._cond.notify_all()
                self.dispatch.wake()

    def _wait_for_clients(self) -> bool:
        while not self._stopping.is_set():
            with self._cond:
                self._reap_dead_workers()
                if self.workers:
                    return True
                self.message = "waiting for client workers to join"
                self._cond.wait(0.2)
        return False

    def _run_round_with_retries(self, rnd: int) -> bool:
        clients = self.spec.clients
        for attempt in range(clients.maxRoundRetries + 1):
            got = self._run_round(rnd, attempt)
            if got is None:
                return True
            if self._stopping.is_set():
                return False
            log.warning("round %d attempt %d: %d of minPerRound=%d updates in %.0fs; retrying",
                        rnd, attempt + 1, got, clients.min_per_round, clients.roundTimeoutSeconds)
        self.phase = "Failed"
        self.message = (
            f"round {rnd} got fewer than clients.minPerRound={clients.min_per_round} updates within "
            f"clients.roundTimeoutSeconds={clients.roundTimeoutSeconds} in {clients.maxRoundRetries + 1} "
            f"attempts (workers connected: {len(self.workers)}); start more client workers or lower minPerRound"
        )
        log.error("federation failed: %s", self.message)
        return False

    def _sample(self, rnd: int, attempt: int) -> list[tuple[str, str | None]]:
        silos = sorted({w.silo for w in self.workers.values() if w.silo})
        return sample_clients(self.spec, rnd, attempt, silos, self.agg_state.reputation)

    def _run_round(self, rnd: int, attempt: int) -> int | None:
        """One attempt at a round. Returns None when it completed, else the number of updates it got."""
        sent0, recv0 = self.traffic.wire["downlink"], self.traffic.wire["uplink"]
        with self._cond:
            sampled = self._sample(rnd, attempt)
            tasks = {}
            for client_id, silo in sampled:
                tid = f"r{rnd}a{attempt}-{client_id}"
                tasks[tid] = Task(tid, rnd, client_id, silo, self.version)
            # under the lock: a late update of the last round cannot reach the new round's aggregator
            self.current = RoundState(rnd, attempt, time.time(), tasks,
                                      self.pipeline.begin_round(rnd, self.params, len(tasks),
                                                                [t.client_id for t in tasks.values()]))
            self.book.start_round(tasks)
            self._cond.notify_all()
            self.dispatch.wake()
            deadline = time.monotonic() + self.spec.clients.roundTimeoutSeconds
            cur = self.current
            order, first_open = list(tasks.values()), 0  # done, dropped, cancelled are final: scan once
            while not self._stopping.is_set():
                while first_open < len(order) and order[first_open].state not in ("queued", "assigned"):
                    first_open += 1
                if first_open == len(order):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(0.25, remaining))
                self._reap_dead_workers()
            cur.closed = True
            self.book.close_round()
            accepted = cur.accepted
        if accepted < self.spec.clients.min_per_round or accepted == 0:
            return accepted

        outcome = cur.aggregator.finish(self.agg_state)
        self.params, self.opt_state = server_update(self.params, outcome.aggregate,
                                                    self.spec.aggregation.serverOptimizer, self.opt_state)
        set_params(self.model, self.params)
        loss, acc = evaluate(self.model, self.eval_data)
        ended = time.time()
        record: dict[str, Any] = {
            "round": rnd,
            "accuracy": acc,
            "loss": loss,
            "round_seconds": ended - cur.started,
            "train_seconds": max(cur.train_seconds.values(), default=0.0),
            "participants": accepted,
            "attempts": attempt + 1,
            "started_at": cur.started,
            "ended_at": ended,
            "bytes_sent": self.traffic.wire["downlink"] - sent0,
            "bytes_received": self.traffic.wire["uplink"] - recv0,
            "compression_ratio": self.traffic.ratios(),
        }
        if self.spec.byzantine.detection is not None:
            record["byzantine"] = self._byzantine_record(rnd, outcome)
        # checkpoint first: a round that /status reports as completed is always on disk
        step = self.downlink.prepare(self.params, model_version(self.run_id, rnd))
        self._checkpoint(rnd, [*self.history, record], outcome.state, *self.downlink.state_after(step))
        with self._cond:
            self.agg_state = outcome.state
            self._note_flags(rnd, outcome)
            self.completed = rnd
            self.participants = accepted
            self.history.append(record)
            self.version = step.version
            self.downlink.commit(step)
            self.current = None
            self.book.end_round()
        self._m["round"].set(rnd)
        self._m["rounds_total"].inc()
        self._m["round_duration"].observe(record["round_seconds"])
        self._m["accuracy"].set(acc)
        self._m["loss"].set(loss)
        log.info("round %d/%d: accuracy %.4f loss %.4f (%d updates, %.2fs)", rnd, self.spec.rounds, acc, loss,
                 accepted, record["round_seconds"])
        self._check_learning()
        return None

    def _check_learning(self) -> None:
        stuck = stuck_at_majority([h["accuracy"] for h in self.history], self._majority)
        if stuck and not self.warning:
            self.warning = stuck_message(len(self.history), self._majority,
                                         self.normalizer.mode if self.normalizer else "none")
            log.warning("%s", self.warning)
        elif not stuck:
            self.warning = ""

    # ------------------------------------------------------------------------------ normalisation

    def _fix_normalization(self) -> None:
        """Combine every client's feature statistics (simulated partitions and joined silos) once."""
        if self.normalize_mode != "none":
            with self._cond:
                silos = dict(self.silo_features)
            parts = [feature_stats(self.data.client(i).x) for i in range(self.data.num_clients)]
            shape = self.data.input_shape
            for silo, st in sorted(silos.items()):
                if st.shape == shape:
                    parts.append(st)
                else:
                    log.warning("silo %s: feature statistics of shape %s do not match %s; left out of "
                                "data.normalize", silo, st.shape, shape)
            pooled = combine_stats(parts)
            self._set_normalizer(normalizer_from_stats(self.normalize_mode, pooled))
            log.info("data.normalize=%s: statistics of %d clients (%d samples, %d silos) combined",
                     self.normalize_mode, len(parts), pooled.count, len(parts) - self.data.num_clients)
        self._normalization_fixed = True

    def _set_normalizer(self, nz: Normalizer | None) -> None:
        self.normalizer = nz
        self.eval_data = nz.apply(self.data.test) if nz is not None else self.data.test
        self._norm_pb = normalizer_to_proto(nz) if nz is not None else None
        self._normalization_fixed = True

    def _byzantine_record(self, rnd: int, outcome: RoundResult) -> dict[str, Any]:
        det = self.spec.byzantine.detection
        assert det is not None
        return {
            "method": det.method,
            "threshold": det.effective_threshold,
            "scores": [s.as_dict() for s in outcome.scores],
            "flagged": outcome.flagged,
            "quarantined": outcome.newly_quarantined,
            "used": outcome.used,
        }

    def _note_flags(self, rnd: int, outcome: RoundResult) -> None:
        """Metrics and silo flags for a round's detection table (caller holds the lock)."""
        det = self.spec.byzantine.detection
        if det is None:
            return
        if outcome.flagged:
            self.metrics.byzantine_flagged.labels(**self._lv, reason=det.method).inc(len(outcome.flagged))
        for s in outcome.scores:
            if self._client_series(s.client):
                self.metrics.anomaly_score.labels(**self._lv, client=s.client).set(s.score)
            if s.client in self.silo_stats:
                self.silo_stats[s.client]["flagged"] = s.flagged or is_quarantined(
                    self.agg_state.reputation, s.client, rnd + 1)
        for c in outcome.newly_quarantined:
            log.warning("client %s quarantined after round %d", c, rnd)

    def _client_series(self, client: str) -> bool:
        """Silos always get a per-client series; simulated clients only the first monitoring.maxClientSeries
        (Prometheus labels must stay bounded)."""
        if not client.startswith("sim-") or client in self._series:
            return True
        if len(self._series) >= self.spec.monitoring.maxClientSeries:
            return False
        self._series.add(client)
        return True

    def flagged_clients(self) -> list[dict[str, Any]]:
        """Every client flagged so far: how often, when last, why, and whether it is quarantined now."""
        table: dict[str, dict[str, Any]] = {}
        for rec in self.history:
            byz = rec.get("byzantine")
            if not byz:
                continue
            for c in byz["flagged"]:
                row = table.setdefault(c, {"client": c, "reason": byz["method"], "rounds": 0})
                row["rounds"] += 1
                row["lastRound"] = rec["round"]
                row["reason"] = byz["method"]
        nxt = self.completed + 1
        for c, row in table.items():
            row["quarantined"] = bool(is_quarantined(self.agg_state.reputation, c, nxt))
        return sorted(table.values(), key=lambda r: (-r["rounds"], r["client"]))

    def _checkpoint(self, completed: int, history: list[dict[str, Any]], agg_state: AggregationState,
                    held: Params | None = None, steps: list[dict[str, Any]] | None = None) -> None:
        save_checkpoint(self.state_dir / CHECKPOINT_FILE, {
            "format": 1,
            "federation": self.name,
            "run_id": self.run_id,
            "completed_round": completed,
            "params": self.params,
            "optimizer": state_to_dict(self.opt_state),
            "aggregation": agg_state.to_dict(),
            "history": history,
            "normalization": self.normalizer.to_state() if self.normalizer is not None else None,
            "layout": [(t.name, t.dtype, list(t.shape)) for t in self.layout.tensors],
            # what the workers will hold after this round: uplink deltas are decoded against it
            "downlink_held": held,
            "downlink_steps": steps or [],  # the last compression.downlink.history steps to `held`
        })
        _write_json_atomic(self.state_dir / "metrics.json", {**self.metrics_document(), "rounds": history})

    def _finish(self) -> None:
        tmp = self.state_dir / "model.pt.tmp"
        torch.save(self.params, tmp)
        os.replace(tmp, self.state_dir / "model.pt")
        _write_json_atomic(self.state_dir / "metrics.json", self.metrics_document(), indent=2)
        self.message = f"completed {self.completed} rounds"
        log.info("federation %s succeeded: %s", self.name, self.message)

    def metrics_document(self) -> dict[str, Any]:
        return {
            "federation": self.name,
            "namespace": self.namespace,
            "rounds_planned": self.spec.rounds,
            "model": self.spec.model.name,
            "model_parameters": count_parameters(self.model),
            "model_bytes": self.layout.total_bytes,
            "rounds": self.history,
            "silos": self.silo_stats,
            "compression": self.compression_document(),
            "aggregation": {"rule": self.spec.aggregation.rule, "buffered": self.pipeline.buffered},
            "flaggedClients": self.flagged_clients(),
            "attack": self._attack_document(),
        }

    def _attack_document(self) -> dict[str, Any] | None:
        attack = self.spec.byzantine.attack
        if attack is None:
            return None
        return {"type": attack.type, "attackers": sorted(self.pipeline.attackers),
                "parameters": dict(attack.parameters), "seed": attack.seed,
                "description": describe_attack(self.spec, sorted(self.pipeline.attackers))}

    def wait_for_workers_to_leave(self, timeout: float) -> bool:
        """After the last round: keep answering STOP until every joined worker has left, or `timeout`.

        A resumed server lingers a little longer in any case: a worker that lost the previous server and is
        waiting out its reconnect backoff has not joined yet, and must still learn the federation is over.
        """
        start = time.monotonic()
        deadline = start + timeout
        floor = start + (min(RECONNECT_BACKOFF_MAX + 1.0, timeout) if self.resumed else 0.0)
        with self._cond:
            while (self.workers or time.monotonic() < floor) and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(0.25, remaining))
                self._reap_dead_workers()
            return not self.workers

    # ------------------------------------------------------------------------------------ bookkeeping

    def status(self) -> dict[str, Any]:
        """`GET /status`, written through the model the operator reads it with (extra keys are kept)."""
        last = self.history[-1] if self.history else {}
        flagged = self.flagged_clients()
        return ServerStatus.model_validate({
            "federation": self.name,
            "phase": self.phase,
            "round": self.completed,
            "rounds": self.spec.rounds,
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            "epsilon": None,
            "clients": {"connected": len(self.workers), "participants": self.participants},
            "byzantineFlagged": len(flagged),
            "flaggedClients": flagged,
            "byzantine": last.get("byzantine"),
            "compressionRatio": self.traffic.ratios()["uplink"],
            "compression": self.compression_document(),
            "pendingTasks": self.book.pending(),
            "message": self.message,
            "warning": self.warning,
            "normalize": self.normalizer.mode if self.normalizer is not None else "none",
            "roundStartedAt": self.current.started if self.current else None,
            "silos": self.silo_stats,
        }).payload()

    def compression_document(self) -> dict[str, Any]:
        """Compression settings and measured ratios (uncompressed over wire bytes), for /status and metrics.json."""
        return {"uplink": self.uplink.model_dump(), "downlink": self.spec.compression.downlink.model_dump(),
                "ratio": self.traffic.ratios(), "wireBytes": dict(self.traffic.wire)}

    def _reap_dead_workers(self) -> None:
        """Forget workers that stopped beating and requeue their tasks (caller holds the lock)."""
        for wid in self.dispatch.reap_due():
            w = self.workers[wid]
            log.warning("worker %s (%s) stopped responding; requeueing its task", w.name, wid)
            self._drop_worker(wid)

    def _drop_worker(self, wid: str) -> None:
        w = self.book.drop_worker(wid)
        if w is None:
            return
        if w.silo and w.silo in self.silo_stats:
            self.silo_stats[w.silo]["joined"] = False
        self._m["clients_connected"].set(len(self.workers))
        self._cond.notify_all()
        self.dispatch.wake()

    def check_token(self, token: str, silo: str | None = None) -> bool:
        if silo:
            want = self.silo_tokens.get(silo)
            return want is not None and hmac.compare_digest(want, token)
        return any(hmac.compare_digest(t, token) for t in self.worker_tokens)

    def worker_token_ok(self, worker_id: str, token: str) -> WorkerInfo | None:
        w = self.workers.get(worker_id)
        if w is None or not self.check_token(token, w.silo):
            return None
        return w

    def join(self, req: pb.JoinRequest) -> WorkerInfo | None:
        silo = req.silo or None
        if not self.check_token(req.token, silo):
            return None
        with self._cond:
            wid = secrets.token_hex(6)
            w = WorkerInfo(wid, req.worker_name or wid, silo, int(req.silo_samples), time.monotonic())
            self.book.add_worker(w)
            if silo:
                self.silo_stats.setdefault(silo, {"joined": True, "roundsParticipated": 0,
                                                  "lastUpdateTime": None, "flagged": False})["joined"] = True
                if req.HasField("feature_stats"):
                    try:
                        self.silo_features[silo] = stats_from_proto(req.feature_stats)
                    except DataError as exc:
                        log.warning("silo %s: ignoring its feature statistics: %s", silo, exc)
            self._m["clients_connected"].set(len(self.workers))
            self._cond.notify_all()
        log.info("worker %s joined as %s%s", w.name, wid, f" (silo {silo})" if silo else "")
        return w

    def next_tasks(self, w: WorkerInfo, wait: float, max_tasks: int = 1) -> list[Task] | str:
        """Assign the next batch this worker may take; 'stop' when the federation is over, 'none' if idle."""
        return self.dispatch.next_tasks(w, wait, max_tasks)

    def reject(self, reason: str, detail: str, task: Task | None = None, late: bool = False,
               lease: int | None = None) -> pb.SubmitReply:
        if task is not None:
            with self._cond:
                if self.book.retry(task, lease):
                    self._cond.notify_all()
                    self.dispatch.wake()
        self.metrics.updates.labels(**self._lv, outcome="late" if late else "rejected").inc()
        self.metrics.rejections.labels(**self._lv, reason=reason).inc()
        log.warning("update rejected (%s): %s", reason, detail)
        return pb.SubmitReply(accepted=False, reason=reason, detail=detail)

    def expected_samples(self, task: Task, w: WorkerInfo) -> int:
        if task.silo:
            return w.silo_samples
        return len(self.data.partitions[int(task.client_id.removeprefix("sim-"))])

    def submit(self, stream: Iterator[bytes]) -> pb.SubmitReply:
        """Take one update stream of serialized UpdateMessages (a header, then chunk frames)."""
        wire = [0]

        def counted() -> Iterator[bytes]:
            for raw in stream:
                wire[0] += len(raw)
                yield raw

        messages = counted()
        try:
            return self._submit(messages)
        finally:
            # every message that arrived counts, whatever became of the update (an unread rest does not)
            self.traffic.record("uplink", wire[0], wire[0])

    def _submit(self, messages: Iterator[bytes]) -> pb.SubmitReply:
        try:
            first = pb.UpdateMessage.FromString(next(messages))
        except (StopIteration, grpc.RpcError, ValueError):
            return self.reject("malformed", "empty update stream")
        except Exception:  # protobuf's DecodeError
            return self.reject("malformed", "the update's header is not valid protobuf")
        if first.WhichOneof("body") != "header":
            return self.reject("malformed", "the first message of an update must be its header")
        h = first.header
        with self._cond:
            w = self.workers.get(h.worker_id)
            if w is None:
                ok = self.check_token(h.token) or any(
                    hmac.compare_digest(t, h.token) for t in self.silo_tokens.values())
                return self.reject("bad_token" if not ok else "unknown_worker",
                                   f"worker {h.worker_id!r} is unknown or its token is wrong")
            if not self.check_token(h.token, w.silo):
                return self.reject("bad_token", f"wrong token for worker {h.worker_id!r}")
            w.last_seen = time.monotonic()
            cur = self.current
            task = cur.tasks.get(h.task_id) if cur else None
            if task is None or cur is None or cur.closed:
                late = h.round <= self.completed + 1 and h.round > 0
                return self.reject("wrong_round", f"task {h.task_id!r} for round {h.round} is not open "
                                   f"(current round {self.completed + 1})", late=late)
            if h.round != task.round:
                return self.reject("wrong_round", f"update says round {h.round}, task is for round {task.round}",
                                   task)
            if task.worker_id != w.worker_id or task.state != "assigned":
                if h.task_id in w.revoked:  # moved to an idle worker (scheduler.TaskBook): not an error
                    self.metrics.updates.labels(**self._lv, outcome="late").inc()
                    return pb.SubmitReply(accepted=False, reason="reassigned", revoked=sorted(w.revoked),
                                          detail=f"task {h.task_id!r} was given to an idle worker")
                if task.state == "done":
                    return self.reject("duplicate", f"task {h.task_id!r} was already submitted and accepted: "
                                       "this update is a replay and was ignored")
                return self.reject("unknown_task", f"task {h.task_id!r} is not assigned to this worker")
            if h.client_id != task.client_id:
                return self.reject("malformed", f"client {h.client_id!r} does not match the task", task)
            if h.base_version != task.version:
                return self.reject("stale_version", "update was trained from another model version", task)
            want = self.expected_samples(task, w)
            if not 0 < h.num_samples <= max(want, 1):
                return self.reject("malformed", f"num_samples {h.num_samples} is outside 1..{want}", task)
            lease = task.leases
            base = self.downlink.held  # what the client trained from (its version was checked above)
        try:
            params = self.receive_update(h, messages, base)
        except Rejected as exc:
            return self.reject(exc.reason, exc.detail, task, lease=lease)
        except grpc.RpcError:
            # the client went away mid-upload, or sent a message above gRPC's hard limit (it then got
            # RESOURCE_EXHAUSTED); either way nothing of it was used
            return self.reject("aborted", "the update stream broke off before its end", task, lease=lease)
        if h.compressed:  # the ratio's uncompressed side: the same messages with the full model in them
            self.traffic.record("uplink", 0, self.layout.total_bytes - h.total_bytes)
        with self._cond:
            if cur.closed or task.state != "assigned" or task.worker_id != w.worker_id or task.leases != lease:
                self.metrics.updates.labels(**self._lv, outcome="late").inc()
                return pb.SubmitReply(accepted=False, reason="late", detail="the round closed before the update")
            cur.aggregator.add(task.client_id, params, float(h.num_samples))
            cur.accepted += 1
            self.book.accept(task, w)
            cur.train_seconds[w.worker_id] = cur.train_seconds.get(w.worker_id, 0.0) + max(0.0, h.train_seconds)
            if w.silo:
                s = self.silo_stats[w.silo]
                s["roundsParticipated"] += 1
                s["lastUpdateTime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.metrics.updates.labels(**self._lv, outcome="accepted").inc()
            self._cond.notify_all()
            revoked = sorted(w.revoked)
        return pb.SubmitReply(accepted=True, revoked=revoked)

    def receive_update(self, h: pb.UpdateHeader, messages: Iterator[bytes], base: Params) -> Params:
        """Assemble and check an update's chunks, then, for a compressed one, decode and check it against
        `base`: nothing after intake sees anything but a complete, checked model. Raises `Rejected`."""
        if not h.compressed:
            layout = self.layout
        elif h.total_bytes > comp.max_payload_bytes(comp.float_count(base)):
            raise Rejected("oversized", f"a compressed update of {h.total_bytes} bytes; the model has "
                           f"{self.layout.total_bytes}")
        else:
            layout = comp.payload_layout(h.total_bytes)
        asm = BlobAssembler(h.tensors, h.total_bytes, layout, max_chunk_bytes=self.max_message)
        for raw in messages:
            asm.add(read_chunk(raw, pb.UpdateMessage))
        params = asm.finish()
        if not h.compressed:
            return params
        return comp.decode_update(params[comp.COMPRESSED].numpy().data, base)

    def heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        with self._cond:
            w = self.worker_token_ok(req.worker_id, req.token)
            if w is None:
                return pb.HeartbeatReply(known=False, task_valid=False)
            w.last_seen = time.monotonic()
            valid = bool(req.task_id) and self.book.holds(w, req.task_id)
            return pb.HeartbeatReply(known=True, task_valid=valid, revoked=sorted(w.revoked))

    def leave(self, req: pb.LeaveRequest) -> None:
        with self._cond:
            if self.worker_token_ok(req.worker_id, req.token) is not None:
                self._drop_worker(req.worker_id)


class _Servicer(pb_grpc.FederatorServicer):
    """gRPC adapter: unpacks requests, calls the server, packs replies."""

    def __init__(self, server: FederationServer) -> None:
        self.s = server

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        w = self.s.join(request)
        if w is None:
            self.s.metrics.rejections.labels(**self.s._lv, reason="bad_token").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token: check the client's token file")
        assert w is not None
        return pb.JoinReply(worker_id=w.worker_id, heartbeat_seconds=max(1, round(self.s.heartbeat_seconds)),
                            federation=self.s.name, chunk_bytes=self.s.chunk_bytes,
                            input_shape=list(self.s.data.train.input_shape),
                            num_classes=self.s.data.train.num_classes)

    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> Iterator[pb.TaskMessage | bytes]:
        s = self.s
        w = s.worker_token_ok(request.worker_id, request.token)
        if w is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown worker or wrong token: join again")
        assert w is not None
        got = s.next_tasks(w, request.wait_seconds, request.max_tasks)
        if got == "gone":
            context.abort(grpc.StatusCode.NOT_FOUND, "this worker was dropped: join again")
        if isinstance(got, str):
            kind = pb.TaskHeader.STOP if got == "stop" else pb.TaskHeader.NONE
            idle = pb.TaskMessage(header=pb.TaskHeader(kind=kind, reason=s.phase))
            yield idle
            s.traffic.record("downlink", idle.ByteSize(), idle.ByteSize())
            return
        with s._cond:
            offer, version = s.downlink.offer(request.have_version), s.version
        enc = offer.encoded
        first, more = got[0], [pb.BatchTask(task_id=t.task_id, client_id=t.client_id) for t in got[1:]]
        header = pb.TaskMessage(header=pb.TaskHeader(
            kind=pb.TaskHeader.TRAIN, task_id=first.task_id, round=first.round, client_id=first.client_id,
            version=version, weights_included=enc is not None, tensors=list(enc.specs) if enc else [],
            total_bytes=enc.total_bytes if enc else 0, compressed=offer.compressed, delta_base=offer.delta_base,
            normalization=s._norm_pb, more=more,
        ))
        wire = header.ByteSize()
        yield header
        if enc is not None:
            for frame in enc.frames():
                wire += len(frame)
                yield frame
        # counted once the stream is handed to gRPC in full; the uncompressed side is the full model's bytes
        s.traffic.record("downlink", wire, wire - (enc.total_bytes if enc else 0) + offer.raw_bytes)

    def SubmitUpdate(self, request_iterator: Iterator[bytes],
                     context: grpc.ServicerContext) -> pb.SubmitReply:
        return self.s.submit(request_iterator)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        return self.s.heartbeat(request)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        self.s.leave(request)
        return pb.LeaveReply()


def _add_servicer(servicer: _Servicer, server: grpc.Server) -> None:
    """The generated registration, except that the model's chunks skip protobuf objects both ways
    (GetTask sends ready chunk frames, SubmitUpdate hands over raw messages): see transport.chunk_frame."""
    def unary(method: Any, request: Any, reply: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=request.FromString,
                                                   response_serializer=reply.SerializeToString)

    handlers = {
        "Join": unary(servicer.Join, pb.JoinRequest, pb.JoinReply),
        "GetTask": grpc.unary_stream_rpc_method_handler(
            servicer.GetTask, request_deserializer=pb.TaskRequest.FromString, response_serializer=serialize_message),
        "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.SubmitUpdate, request_deserializer=None, response_serializer=pb.SubmitReply.SerializeToString),
        "Heartbeat": unary(servicer.Heartbeat, pb.HeartbeatRequest, pb.HeartbeatReply),
        "Leave": unary(servicer.Leave, pb.LeaveRequest, pb.LeaveReply),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _write_json_atomic(path: Path, doc: dict[str, Any], indent: int | None = None) -> None:
    """Replace ``path`` with ``doc``. Compact by default: json's C encoder, 2.5x faster than ``indent``
    on a 200-round history (the server writes it every round)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=indent))
    os.replace(tmp, path)


LAST_ERROR_FILE = "last-error"  # one line: why the server stopped with an error, read by `federator run`


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, int(os.environ.get("FEDERATOR_TORCH_THREADS", "1"))))
    lifeline.watch_parent()
    state_dir = Path(args.state_dir)
    (state_dir / LAST_ERROR_FILE).unlink(missing_ok=True)
    try:
        return _serve(args, state_dir)
    except StateDirLocked as exc:
        log.error("%s", exc)  # not written into the folder: it belongs to the running server
        return 2
    except (ManifestError, TokensError, DataError, ModelError, CheckpointError, OSError, RuntimeError) as exc:
        log.exception("the server stopped: %s", exc)
        _write_last_error(state_dir, str(exc))
        return 2 if isinstance(exc, ManifestError | TokensError) else 1
    except Exception as exc:
        log.exception("the server crashed")
        _write_last_error(state_dir, f"the server crashed: {type(exc).__name__}: {exc}")
        return 1


def _write_last_error(state_dir: Path, reason: str) -> None:
    with contextlib.suppress(OSError):
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / LAST_ERROR_FILE).write_text(" ".join(reason.split()) + "\n")


def _serve(args: argparse.Namespace, state_dir: Path) -> int:
    fed = load_federation_config(args.config)
    tokens = read_server_tokens(args.token_file, "FEDERATOR_TOKENS")
    if not tokens:
        raise TokensError('no tokens: pass --token-file or set FEDERATOR_TOKENS, as JSON: {"workers": ["TOKEN"]}')
    port = fed.spec.server.port if args.port is None else args.port
    mport = fed.spec.server.metricsPort if args.metrics_port is None else args.metrics_port
    if bool(args.tls_cert) != bool(args.tls_key):
        raise TokensError("--tls-cert and --tls-key go together: pass both or neither")
    tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes()) if args.tls_cert else None
    lock_state_dir(state_dir)  # held until this process ends, taken before the checkpoint is read
    server = FederationServer(fed, state_dir, tokens, args.host, port, mport, tls=tls).start()
    if args.ready_file:
        Path(args.ready_file).write_text(f"{server.port} {server.metrics_port}\n")

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        server._stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        code = server.run()
    except Exception as exc:
        server.phase = "Failed"
        server.message = (f"the server crashed after {server.completed} of {fed.spec.rounds} rounds: "
                          f"{type(exc).__name__}: {exc}; a restarted server resumes from its checkpoint")
        server.stop()
        raise
    if args.linger_seconds < 0:
        # in a cluster: a finished (or failed) federation keeps its result visible and tells every worker
        # that asks to STOP, until the pod is stopped; exiting would only restart the pod
        log.info("federation %s: serving its %s status until stopped", fed.metadata.name, server.phase.lower())
        server._stopping.wait()
    elif args.linger_seconds > 0 and not server._stopping.is_set():
        server.wait_for_workers_to_leave(args.linger_seconds)
    server.stop()
    if code != 0 and server.phase == "Failed":
        _write_last_error(state_dir, server.message)
    return code
