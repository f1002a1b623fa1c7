"""Federator against Flower on the same task, in the same run, on the same machine (DESIGN section 8).

Two workloads, each described once by a Federation manifest in ``benchmarks/manifests/``:

* ``quickstart``: ``examples/quickstart.yaml`` (digits, MLP 64-64-10, 10 IID clients, 15 rounds);
* ``mlp4m``: the same task with an MLP 64-2048-2048-10 (4.35M parameters, 17.4 MB), 5 rounds, where
  moving the model dominates a round.

Federator runs with ``federator run MANIFEST --out DIR --quiet`` (a server and worker processes over gRPC
on 127.0.0.1) from the project's virtualenv. Flower runs from its own virtualenv (``.venv-bench``: its
protobuf pin conflicts with Federator's) with its deployment runtime: a SuperLink, one SuperNode per
client, and the hand-written app in ``benchmarks/flower-app`` submitted with ``flwr run``; every
hyperparameter is taken from the same manifest. Flower also runs with its ``start_server`` /
``start_client`` gRPC API (``flower_bench/legacy.py``: long-lived client processes, no polling), the
fastest Flower configuration, against which the overhead goal is judged. For the large model the
script also measures the loopback limit: a plain TCP transfer of the model's bytes over 127.0.0.1.

It writes its section of ``docs/benchmarks.md`` (between markers, leaving other sections alone), two
plots next to it, and the raw numbers under ``results/bench-flower/``. Run it with ``make bench``.
This is a benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from docsection import DOC, cpu_model, write_section

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
FLOWER_APP = BENCH_DIR / "flower-app"
MANIFESTS = BENCH_DIR / "manifests"
PLOT_ACCURACY = ROOT / "docs" / "bench-flower-accuracy.png"
PLOT_OVERHEAD = ROOT / "docs" / "bench-flower-overhead.png"
SECTION_BEGIN = "<!-- BEGIN flower-comparison (written by benchmarks/bench_flower.py; edits here are lost) -->"
SECTION_END = "<!-- END flower-comparison -->"
TARGET_ACCURACY = 0.90
OVERHEAD_GOAL = 0.5  # Federator's overhead per round at most half of Flower's
TRANSFER_GOAL = 3.0  # Federator's model transfer within 3x of the loopback copy limit
LOOPBACK_REPEATS = 7
# A Flower round costs about a minute on 2 cores (10 fresh ClientApp processes importing torch each
# round), so by default Flower runs only the first rounds: enough to pass 0.90 accuracy (round 3 of the
# quickstart, round 1-2 of mlp4m) and keep `make bench` near 10 minutes. `--flower-rounds all` runs all.
FLOWER_ROUNDS = {"quickstart": 4, "mlp4m": 2}


class BenchError(RuntimeError):
    """A framework run that failed; the message says where its log is."""


# ------------------------------------------------------------------------------------------ results


@dataclass
class Round:
    round: int
    accuracy: float
    loss: float
    round_seconds: float  # from the start of the round to the end of its central evaluation
    train_seconds: float  # critical path of local training in this round
    elapsed_seconds: float  # since round 1 started, at the end of this round
    participants: int
    bytes_moved: int | None = None  # bytes the framework itself counted on the wire, when it does

    @property
    def overhead_seconds(self) -> float:
        return self.round_seconds - self.train_seconds


@dataclass
class Run:
    framework: str
    workload: str
    startup_seconds: float  # harness launch until round 1 starts
    total_seconds: float  # harness launch until the results are in
    model_parameters: int
    model_bytes: int
    rounds: list[Round]
    cpu_busy_before: float  # share of the machine's CPU used by other processes just before launch
    details: dict[str, Any] = field(default_factory=dict)
    stats_rounds: int | None = None  # per-round statistics use only the first this many rounds

    @property
    def compared(self) -> list[Round]:
        """The rounds that per-round statistics are taken over (the rounds both frameworks ran)."""
        return self.rounds[: self.stats_rounds]

    def median(self, value: Callable[[Round], float]) -> float:
        return statistics.median(value(r) for r in self.compared)

    def mean(self, value: Callable[[Round], float]) -> float:
        return statistics.fmean(value(r) for r in self.compared)

    def time_to(self, accuracy: float) -> float | None:
        """Seconds from the start of round 1 to the end of the first round at ``accuracy`` or better."""
        return next((r.elapsed_seconds for r in self.rounds if r.accuracy >= accuracy), None)

    def time_from_launch(self, accuracy: float) -> float | None:
        t = self.time_to(accuracy)
        return None if t is None else self.startup_seconds + t

    def round_to(self, accuracy: float) -> int | None:
        return next((r.round for r in self.rounds if r.accuracy >= accuracy), None)


@dataclass
class Workload:
    name: str
    manifest: Path
    spec: dict[str, Any]  # the manifest's spec, defaults filled in by Federator's own API models
    federator: Run | None = None
    flower: Run | None = None  # the deployment runtime with its default (and only) settings
    flower_legacy: Run | None = None  # start_server / start_client: long-lived client processes
    loopback_bytes_per_second: float | None = None
    loopback_samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- the machine


def cpu_busy_fraction(interval: float = 1.0) -> float:
    """Share of all cores that was busy over ``interval`` seconds (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` of the CPU."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy_fraction()
    while busy >= threshold and time.monotonic() < deadline:
        busy = cpu_busy_fraction()
    return busy


def memory_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def versions(python_bench: Path) -> dict[str, str]:
    """Versions of everything that matters, from both virtualenvs."""
    probe = (
        "import json, sys, importlib.metadata as m\n"
        "names = ['torch', 'grpcio', 'protobuf', 'numpy', 'scikit-learn', 'flwr', 'federator']\n"
        "out = {'python': sys.version.split()[0]}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    found: dict[str, str] = {}
    for prefix, python in (("federator", sys.executable), ("flower", str(python_bench))):
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout
        for name, version in json.loads(out).items():
            found[f"{prefix}.{name}"] = version
    return found


# -------------------------------------------------------------------------------- processes and ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"the process that should listen on 127.0.0.1:{port} exited")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def stop(procs: Sequence[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM each process's group (each was started in its own session), then SIGKILL stragglers."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@contextlib.contextmanager
def started(procs: list[subprocess.Popen[bytes]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    try:
        yield procs
    finally:
        stop(procs)


# ---------------------------------------------------------------------------------------- loopback


def _loopback_sink(port: int, nbytes: int, repeats: int) -> None:
    """Receive ``repeats`` payloads of ``nbytes`` into one buffer, acknowledging each with one byte."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(repeats):
            got = 0
            while got < nbytes:
                n = s.recv_into(view[got:], nbytes - got)
                if n == 0:
                    return
                got += n
            s.sendall(b"k")


def loopback_transfer_seconds(nbytes: int, repeats: int = LOOPBACK_REPEATS) -> list[float]:
    """Seconds for a plain TCP transfer of ``nbytes`` from this process to another one on 127.0.0.1.

    The sender writes the whole payload with ``sendall`` and stops the clock when the receiver, a forked
    process reading into a preallocated buffer, acknowledges the last byte: no framing, serialisation
    or copies beyond the kernel's. The fastest of ``repeats`` transfers is the copy limit.
    """
    payload = os.urandom(nbytes)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = int(server.getsockname()[1])
        child = mp.get_context("fork").Process(target=_loopback_sink, args=(port, nbytes, repeats))
        child.start()
        conn, _ = server.accept()
        samples = []
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(repeats):
                start = time.perf_counter()
                conn.sendall(payload)
                if conn.recv(1) != b"k":
                    raise BenchError("loopback receiver closed early")
                samples.append(time.perf_counter() - start)
        child.join(timeout=10)
    return samples


# ---------------------------------------------------------------------------------------- Federator


def load_spec(manifest: Path, federator_python: str) -> dict[str, Any]:
    """The manifest's spec with every default filled in, as Federator itself reads it."""
    code = (
        "import json, sys\n"
        "from federator.api.manifest import load_federation\n"
        "print(json.dumps(load_federation(sys.argv[1]).spec.model_dump(mode='json')))\n"
    )
    try:
        out = subprocess.run(
            [federator_python, "-c", code, str(manifest)], capture_output=True, text=True, check=True
        ).stdout
        spec: dict[str, Any] = json.loads(out)
    except (subprocess.CalledProcessError, json.JSONDecodeError):  # an API in flux: read the YAML as is
        spec = yaml.safe_load(manifest.read_text())["spec"]
    return spec


def run_federator(federator: Path, manifest: Path, out: Path, timeout: float, quiet_wait: float) -> Run:
    out.mkdir(parents=True, exist_ok=True)
    busy = wait_for_quiet(quiet_wait)
    cmd = [str(federator), "run", str(manifest), "--out", str(out / "run"), "--quiet"]
    log_path = out / "federator.log"
    with log_path.open("wb") as log:
        launched = time.time()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"`{shlex.join(cmd)}` ran past {timeout:.0f}s; see {log_path}") from exc
    finished = time.time()
    if proc.returncode != 0:
        raise BenchError(f"`{shlex.join(cmd)}` exited with {proc.returncode}; see {log_path}")
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    records = metrics["rounds"]
    if not records:
        raise BenchError(f"{out / 'run' / 'metrics.json'} has no rounds")
    # Round 1 started at its own wall-clock time when Federator records it; else use its start-up time.
    first_start = records[0].get("started_at")
    startup = (first_start - launched) if first_start else float(metrics["startup_seconds"])
    rounds = [
        Round(
            round=int(r["round"]),
            accuracy=float(r["accuracy"]),
            loss=float(r["loss"]),
            round_seconds=float(r["round_seconds"]),
            train_seconds=float(r["train_seconds"]),
            elapsed_seconds=float(r["elapsed_seconds"]),
            participants=int(r["participants"]),
            bytes_moved=int(r.get("bytes_sent", 0)) + int(r.get("bytes_received", 0)),
        )
        for r in records
    ]
    model_parameters = int(metrics["model_parameters"])
    return Run(
        framework="Federator",
        workload=str(metrics.get("federation", manifest.stem)),
        startup_seconds=startup,
        total_seconds=finished - launched,
        model_parameters=model_parameters,
        model_bytes=int(metrics.get("model_bytes", 4 * model_parameters)),
        rounds=rounds,
        cpu_busy_before=busy,
        details={
            "command": shlex.join(cmd),
            "startup_seconds_reported": metrics.get("startup_seconds"),
            "workers": None,
        },
    )


# ------------------------------------------------------------------------------------------- Flower


def flower_run_config(spec: dict[str, Any], out_file: Path) -> dict[str, Any]:
    """The Flower app's run config for a Federation spec; refuses what the app does not implement."""
    model, data, training, clients = spec["model"], spec["data"], spec["training"], spec["clients"]
    per_round = clients.get("perRound") or clients["count"]
    unsupported = {
        "model.name": (model["name"], "mlp"),
        "data.dataset": (data["dataset"], "digits"),
        "data.partition.scheme": (data["partition"]["scheme"], "iid"),
        "training.optimizer": (training["optimizer"], "sgd"),
        "clients.perRound": (per_round, clients["count"]),
    }
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise BenchError(f"the Flower app implements {name} = {wanted!r} only, the manifest has {value!r}")
    unset = {
        "training.weightDecay": training.get("weightDecay", 0.0),
        "training.proximalMu": training.get("proximalMu", 0.0),
        "model.dropout": model.get("dropout", 0.0),
    }
    for name, value in unset.items():
        if float(value) != 0.0:
            raise BenchError(f"the Flower app does not implement {name} (the manifest sets {value})")
    server_opt = spec.get("aggregation", {}).get("serverOptimizer", {})
    if server_opt and (server_opt.get("name", "sgd"), float(server_opt.get("learningRate", 1.0))) != ("sgd", 1.0):
        raise BenchError("the Flower app implements plain FedAvg only (aggregation.serverOptimizer sgd, rate 1)")
    return {
        "num-server-rounds": int(spec["rounds"]),
        "num-clients": int(clients["count"]),
        "hidden-sizes": ",".join(str(h) for h in model["hiddenSizes"]),
        "local-epochs": int(training["localEpochs"]),
        "batch-size": int(training["batchSize"]),
        "learning-rate": float(training["learningRate"]),
        "momentum": float(training.get("momentum", 0.0)),
        "test-fraction": float(data["testFraction"]),
        "seed": int(data["seed"]),
        "data-file": "",
        "out-file": str(out_file),
    }


def export_data(spec: dict[str, Any], path: Path) -> str:
    """Write Federator's own split and partitions of the manifest's data to ``path`` for the Flower app.

    Returns the file name, or "" when Federator's data API cannot be used (the app then recomputes the
    same split itself).
    """
    try:
        import numpy as np

        from federator.api.models import FederationSpec
        from federator.runtime.data import prepare_data

        data = prepare_data(FederationSpec.model_validate(spec))
        arrays: dict[str, Any] = {"x_test": data.test.x, "y_test": data.test.y}
        for i in range(data.num_clients):
            part = data.client(i)
            arrays[f"x_{i}"], arrays[f"y_{i}"] = part.x, part.y
        np.savez(path, **arrays)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        print(f"  (Federator's data API unusable, the Flower app splits the data itself: {exc})", flush=True)
        return ""
    return str(path)


def _toml(config: dict[str, Any]) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())


def run_flower(
    bench_bin: Path, spec: dict[str, Any], out: Path, timeout: float, quiet_wait: float, rounds: int | None = None
) -> Run:
    """SuperLink + one SuperNode per client on 127.0.0.1, the app submitted with `flwr run`.

    ``rounds`` runs only the first that many of the manifest's rounds.
    """
    bench_bin, out = bench_bin.absolute(), out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    home = out / "flwr-home"  # FAB installs, SuperLink connections: nothing touches ~/.flwr
    home.mkdir(exist_ok=True)
    result_file = out / "serverapp.json"
    result_file.unlink(missing_ok=True)
    config = flower_run_config(spec, result_file)
    if rounds is not None:
        config["num-server-rounds"] = min(rounds, int(config["num-server-rounds"]))
    config["data-file"] = export_data(spec, out / "data.npz")
    num_clients = int(config["num-clients"])
    superlink_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{superlink_port}"\n'
        "insecure = true\n"
    )
    run_config = out / "run-config.toml"
    run_config.write_text(_toml(config))
    env = {
        **os.environ,
        "PATH": f"{bench_bin}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperExec finds flwr-* on PATH
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",  # offline: no telemetry events, no update check
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("VIRTUAL_ENV", None)

    def spawn(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (out / f"{name}.log").open("wb")
        return subprocess.Popen(
            [str(bench_bin / args[0]), *args[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=out,
            start_new_session=True,
        )

    busy = wait_for_quiet(quiet_wait)
    launched = time.time()
    with started([]) as procs:
        # --disable-runtime-dependency-installation: else the SuperLink runs `uv sync`, which needs the network.
        superlink_args = f"--insecure --host 127.0.0.1 --port {superlink_port}".split()
        superlink = spawn(
            "superlink", ["flower-superlink", *superlink_args, "--disable-runtime-dependency-installation"]
        )
        procs.append(superlink)
        wait_for_port(superlink_port, timeout=120, alive=lambda: superlink.poll() is None)
        superlink_ready = time.time()
        for i in range(num_clients):
            # --port: each SuperNode serves its own Runtime API to the ClientApp processes it starts.
            node_args = f"--insecure --superlink 127.0.0.1:{superlink_port} --port {free_port()}".split()
            node_config = ["--node-config", f"partition-id={i} num-partitions={num_clients}"]
            procs.append(spawn(f"supernode-{i}", ["flower-supernode", *node_args, *node_config]))
        submit = [str(bench_bin / "flwr"), "run", str(FLOWER_APP), "bench", "--run-config", str(run_config)]
        with (out / "flwr-run.log").open("wb") as log:
            submitted = subprocess.run(submit, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out, timeout=120)
        if submitted.returncode != 0:
            raise BenchError(f"`flwr run` exited with {submitted.returncode}; see {out / 'flwr-run.log'}")
        # The ServerApp rewrites its result file after every round and sets `finished` at the end.
        deadline = time.monotonic() + timeout
        raw: dict[str, Any] = {}
        problem = ""
        while not raw.get("finished"):
            if time.monotonic() > deadline:
                problem = f"the Flower run did not finish in {timeout:.0f}s; see the logs in {out}"
                break
            if superlink.poll() is not None:
                problem = f"the SuperLink exited with {superlink.returncode}; see {out / 'superlink.log'}"
                break
            time.sleep(0.1)
            with contextlib.suppress(OSError, json.JSONDecodeError):
                raw = json.loads(result_file.read_text())
        finished = time.time()
    if problem and not raw.get("rounds"):
        raise BenchError(problem)
    run = flower_result(raw, launched, finished, busy, superlink_ready, num_clients)
    if problem:
        run.details["incomplete"] = f"{problem} (after {len(run.rounds)} of {config['num-server-rounds']} rounds)"
    return run


LEGACY = "Flower (start_server)"


def run_flower_legacy(bench_bin: Path, spec: dict[str, Any], out: Path, timeout: float, quiet_wait: float) -> Run:
    """Flower's `start_server` / `start_client` gRPC API: one server and one long-lived process per client.

    Deprecated but shipped in flwr 1.41, and its fastest way to run separate processes: clients keep torch
    and their data loaded, the server pushes instructions over open gRPC streams (no polling).
    """
    bench_bin, out = bench_bin.absolute(), out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "server.json"
    result_file.unlink(missing_ok=True)
    config = flower_run_config(spec, result_file)
    config["data-file"] = export_data(spec, out / "data.npz")
    (out / "run-config.json").write_text(json.dumps(config))
    num_clients, port = int(config["num-clients"]), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PYTHONPATH": str(FLOWER_APP)}
    env.pop("VIRTUAL_ENV", None)

    def spawn(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (out / f"{name}.log").open("wb")
        cmd = [str(bench_bin / "python"), "-m", "flower_bench.legacy", *args, "--port", str(port),
               "--config", str(out / "run-config.json")]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out, start_new_session=True)

    busy = wait_for_quiet(quiet_wait)
    launched = time.time()
    raw: dict[str, Any] = {}
    problem = ""
    with started([]) as procs:
        server = spawn("server", ["server"])
        procs.append(server)
        wait_for_port(port, timeout=120, alive=lambda: server.poll() is None)
        server_ready = time.time()
        for i in range(num_clients):
            procs.append(spawn(f"client-{i}", ["client", "--partition-id", str(i)]))
        deadline = time.monotonic() + timeout
        while not raw.get("finished"):
            if time.monotonic() > deadline:
                problem = f"the Flower start_server run did not finish in {timeout:.0f}s; see the logs in {out}"
                break
            if server.poll() is not None and not raw.get("finished"):
                with contextlib.suppress(OSError, json.JSONDecodeError):
                    raw = json.loads(result_file.read_text())
                if not raw.get("finished"):
                    problem = f"the Flower server exited with {server.returncode}; see {out / 'server.log'}"
                break
            time.sleep(0.1)
            with contextlib.suppress(OSError, json.JSONDecodeError):
                raw = json.loads(result_file.read_text())
        finished = time.time()
    if problem and not raw.get("rounds"):
        raise BenchError(problem)
    records = raw["rounds"]
    first = records[0]["start"]
    rounds = [
        Round(round=int(r["round"]), accuracy=float(r["accuracy"]), loss=float(r["loss"]),
              round_seconds=r["end"] - r["start"], train_seconds=float(r["train_seconds"]),
              elapsed_seconds=r["end"] - first, participants=int(r["participants"]))
        for r in records
    ]
    run = Run(framework=LEGACY, workload="", startup_seconds=first - launched, total_seconds=finished - launched,
              model_parameters=int(raw["model_parameters"]), model_bytes=int(raw["model_bytes"]), rounds=rounds,
              cpu_busy_before=busy,
              details={"server_listening_after": server_ready - launched,
                       "all_clients_connected_after": (raw["nodes_ready"] or first) - launched,
                       "clients": num_clients})
    if problem:
        run.details["incomplete"] = f"{problem} (after {len(run.rounds)} rounds)"
    return run


def flower_result(
    raw: dict[str, Any], launched: float, finished: float, busy: float, superlink_ready: float, clients: int
) -> Run:
    records = raw["rounds"]
    first = records[0]["start"]
    rounds = [
        Round(
            round=int(r["round"]),
            accuracy=float(r["accuracy"]),
            loss=float(r["loss"]),
            round_seconds=r["end"] - r["start"],
            train_seconds=float(r["train_seconds"]),
            elapsed_seconds=r["end"] - first,
            participants=int(r["participants"]),
        )
        for r in records
    ]

    # Where a Flower round goes: the ServerApp pushes the messages, each SuperNode pulls its message on its
    # next poll and starts a ClientApp process, which imports the app and trains; the ServerApp pulls the
    # replies on its next poll.
    def per_round(fn: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(fn(r) for r in records)

    breakdown = {
        "to_first_clientapp_process": per_round(lambda r: min(r["process_started"]) - r["start"]),
        "to_last_clientapp_process": per_round(lambda r: max(r["process_started"]) - r["start"]),
        "clientapp_startup": per_round(
            lambda r: statistics.median(i - p for i, p in zip(r["imported"], r["process_started"], strict=True))
        ),
        "last_fit_to_replies": per_round(lambda r: r["replies_at"] - max(r["fit_ended"])),
        "aggregate_and_evaluate": per_round(lambda r: r["end"] - r["replies_at"]),
    }
    return Run(
        framework="Flower",
        workload="",
        startup_seconds=first - launched,
        total_seconds=finished - launched,
        model_parameters=int(raw["model_parameters"]),
        model_bytes=int(raw["model_bytes"]),
        rounds=rounds,
        cpu_busy_before=busy,
        details={
            "breakdown_seconds": breakdown,
            "superlink_listening_after": superlink_ready - launched,
            "serverapp_started_after": raw["main_started"] - launched,
            "all_supernodes_connected_after": raw["nodes_ready"] - launched,
            "supernodes": clients,
        },
    )


# ------------------------------------------------------------------------------------------- report


def fmt_s(seconds: float | None, digits: int = 2) -> str:
    return "n/a" if seconds is None else f"{seconds:.{digits}f} s"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    r = a / b
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x (1/{1 / r:.0f})"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def _get(run: Run | None, fn: Callable[[Run], float | None]) -> float | None:
    return None if run is None else fn(run)


def comparison_table(w: Workload) -> list[str]:
    fed, flw, leg = w.federator, w.flower, w.flower_legacy
    fastest = fastest_flower(w)
    rows: list[tuple[str, Callable[[Run], float | None], int]] = [
        ("wall time per round (median)", lambda r: r.median(lambda x: x.round_seconds), 2),
        ("wall time per round (mean)", lambda r: r.mean(lambda x: x.round_seconds), 2),
        ("local training per round, critical path (median)", lambda r: r.median(lambda x: x.train_seconds), 2),
        ("**framework overhead per round (median)**", lambda r: r.median(lambda x: x.overhead_seconds), 2),
        ("framework overhead per round (mean)", lambda r: r.mean(lambda x: x.overhead_seconds), 2),
        ("start-up (launch until round 1 starts)", lambda r: r.startup_seconds, 1),
        (f"time to {TARGET_ACCURACY:.2f} accuracy, from round 1", lambda r: r.time_to(TARGET_ACCURACY), 2),
        (
            f"time to {TARGET_ACCURACY:.2f} accuracy, from launch",
            lambda r: r.time_from_launch(TARGET_ACCURACY),
            1,
        ),
    ]
    lines = ["| | Federator | Flower, default deployment | Flower, start_server | Federator / fastest Flower |",
             "|---|---:|---:|---:|---:|"]
    for label, fn, digits in rows:
        a, b, c, f = _get(fed, fn), _get(flw, fn), _get(leg, fn), _get(fastest, fn)
        lines.append(f"| {label} | {fmt_s(a, digits)} | {fmt_s(b, digits)} | {fmt_s(c, digits)} | {ratio(a, f)} |")

    def whole(r: Run | None) -> str:
        return "n/a" if r is None else f"{r.total_seconds:.1f} s for {len(r.rounds)} rounds"

    def compared(r: Run | None) -> str:
        return "n/a" if r is None else f"rounds 1-{len(r.compared)}"

    lines.insert(2, f"| per-round statistics over | {compared(fed)} | {compared(flw)} | {compared(leg)} | |")

    def rnd(r: Run | None) -> str:
        if r is None:
            return "n/a"
        n = r.round_to(TARGET_ACCURACY)
        return "not reached" if n is None else f"round {n}"

    def acc(r: Run | None) -> str:
        return "n/a" if r is None else f"{r.rounds[-1].accuracy:.4f} ({len(r.rounds)} rounds)"

    def parts(r: Run | None) -> str:
        return "n/a" if r is None else "/".join(sorted({str(x.participants) for x in r.rounds}))

    lines += [
        f"| whole run (launch until results) | {whole(fed)} | {whole(flw)} | {whole(leg)} | |",
        f"| first round at {TARGET_ACCURACY:.2f} accuracy | {rnd(fed)} | {rnd(flw)} | {rnd(leg)} | |",
        f"| final test accuracy | {acc(fed)} | {acc(flw)} | {acc(leg)} | |",
        f"| clients per round | {parts(fed)} | {parts(flw)} | {parts(leg)} | |",
        f"| CPU busy with other processes just before launch | {_busy(fed)} | {_busy(flw)} | {_busy(leg)} | |",
    ]
    return lines


def _busy(r: Run | None) -> str:
    return "n/a" if r is None else f"{100 * r.cpu_busy_before:.0f}%"


def fastest_flower(w: Workload) -> Run | None:
    """The Flower configuration with the least overhead per round (median): the one the goal is judged on."""
    runs = [r for r in (w.flower, w.flower_legacy) if r is not None]
    return min(runs, key=lambda r: r.median(lambda x: x.overhead_seconds)) if runs else None


def overhead_goal(w: Workload) -> bool | None:
    flw_run = fastest_flower(w)
    if w.federator is None or flw_run is None:
        return None
    fed = w.federator.median(lambda x: x.overhead_seconds)
    flw = flw_run.median(lambda x: x.overhead_seconds)
    return fed <= OVERHEAD_GOAL * flw


def transfer_rows(w: Workload) -> tuple[list[str], bool | None]:
    """Transfer of the large model against the loopback limit; returns table lines and the goal verdict."""
    rate = w.loopback_bytes_per_second
    run = w.federator or w.flower
    if rate is None or run is None:
        return ["(loopback limit not measured)"], None
    model_bytes = run.model_bytes
    clients = max(r.participants for r in run.rounds)
    logical = 2 * clients * model_bytes  # every client downloads the model and uploads its update once
    lines = [
        f"Loopback copy limit: **{rate / 1e9:.2f} GB/s**, the fastest of {len(w.loopback_samples)} plain TCP "
        f"transfers of {model_bytes / 1e6:.1f} MB (the model's bytes) between two processes on 127.0.0.1 "
        f"(median {model_bytes / statistics.median(w.loopback_samples) / 1e9:.2f} GB/s). One model copy at "
        f"that rate takes {1e3 * model_bytes / rate:.1f} ms.",
        "",
        "| per round | Federator | Flower |",
        "|---|---:|---:|",
    ]

    def moved(r: Run | None) -> int | None:
        if r is None:
            return None
        counted = [x.bytes_moved for x in r.rounds if x.bytes_moved]
        return int(statistics.median(counted)) if counted else None

    fed_moved, flw_moved = moved(w.federator), moved(w.flower)

    def mb(n: int | None, note: str = "") -> str:
        return "n/a" if n is None else f"{n / 1e6:.1f} MB{note}"

    lines.append(
        f"| bytes on the wire, as the framework counts them | {mb(fed_moved)} | "
        f"{mb(flw_moved) if flw_moved else 'not counted'} |"
    )
    lines.append(
        f"| model copies that must move ({clients} downloads + {clients} uploads) | {mb(logical)} | {mb(logical)} |"
    )
    fed_ovh = _get(w.federator, lambda r: r.median(lambda x: x.overhead_seconds))
    flw_ovh = _get(w.flower, lambda r: r.median(lambda x: x.overhead_seconds))
    lines.append(
        f"| framework overhead (median), an upper bound on transfer time | {fmt_s(fed_ovh)} | {fmt_s(flw_ovh)} |"
    )
    t_logical = logical / rate
    lines.append(
        f"| loopback time of the {2 * clients} model copies | {fmt_s(t_logical, 3)} | {fmt_s(t_logical, 3)} |"
    )
    lines.append(
        f"| **overhead / loopback time of the {2 * clients} copies** | {ratio(fed_ovh, t_logical)} | "
        f"{ratio(flw_ovh, t_logical)} |"
    )
    ok: bool | None = None
    if fed_ovh is not None and fed_moved:
        t_wire = fed_moved / rate
        lines.append(
            f"| overhead / loopback time of the bytes Federator put on the wire ({fed_moved / 1e6:.1f} MB) | "
            f"{ratio(fed_ovh, t_wire)} | |"
        )
        ok = fed_ovh <= TRANSFER_GOAL * t_wire
    elif fed_ovh is not None:
        ok = fed_ovh <= TRANSFER_GOAL * t_logical
    return lines, ok


def flower_breakdown(w: Workload) -> list[str]:
    if w.flower is None:
        return []
    b = w.flower.details["breakdown_seconds"]
    return [
        f"| {w.name} | {b['to_first_clientapp_process']:.2f} s / {b['to_last_clientapp_process']:.2f} s | "
        f"{b['clientapp_startup']:.2f} s | {w.flower.median(lambda x: x.train_seconds):.2f} s | "
        f"{b['last_fit_to_replies']:.2f} s | {b['aggregate_and_evaluate']:.2f} s |"
    ]


def per_round_table(w: Workload) -> list[str]:
    lines = [
        "| round | Federator accuracy | Federator round / train / overhead | Flower (deployment) accuracy | "
        "Flower (deployment) round / train / overhead | Flower (start_server) accuracy | "
        "Flower (start_server) round / train / overhead |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = (w.federator, w.flower, w.flower_legacy)
    n = max(len(r.rounds) if r else 0 for r in runs)
    for i in range(n):
        cells = [str(i + 1)]
        for run in runs:
            if run is None or i >= len(run.rounds):
                cells += ["", ""]
                continue
            r = run.rounds[i]
            cells += [
                f"{r.accuracy:.4f}",
                f"{r.round_seconds:.2f} / {r.train_seconds:.2f} / {r.overhead_seconds:.2f} s",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(workloads: list[Workload], env: dict[str, Any], elapsed: float) -> str:
    v = env["versions"]
    quick = next((w for w in workloads if w.name == "quickstart"), None)
    big = next((w for w in workloads if w.name == "mlp4m"), None)
    rel = lambda p: p.relative_to(ROOT).as_posix()  # noqa: E731
    docs_rel = lambda p: p.relative_to(DOC.parent).as_posix()  # noqa: E731
    out: list[str] = [
        SECTION_BEGIN,
        "## Federator vs Flower: round overhead, time to accuracy, model transfer",
        "",
        f"Measured {env['date']} by `make bench` (`benchmarks/run.sh` -> `benchmarks/bench_flower.py`), "
        f"{elapsed / 60:.1f} minutes for everything below. Both frameworks ran in the same benchmark run on "
        "the same machine, one after the other (Federator first, then Flower, for each workload).",
        "",
        f"* Machine: {env['nproc']} CPU cores ({env['cpu']}), {env['memory_gib']:.0f} GiB RAM, no GPU, "
        f"{env['os']}.",
        f"* Federator {v.get('federator.federator', '?')} (Python {v.get('federator.python', '?')}, torch "
        f"{v.get('federator.torch', '?')}, grpcio {v.get('federator.grpcio', '?')}, protobuf "
        f"{v.get('federator.protobuf', '?')}), from `.venv`.",
        f"* Flower `flwr` {v.get('flower.flwr', '?')} (Python {v.get('flower.python', '?')}, torch "
        f"{v.get('flower.torch', '?')}, grpcio {v.get('flower.grpcio', '?')}, protobuf "
        f"{v.get('flower.protobuf', '?')}), from `.venv-bench`: Flower pins protobuf < 7, Federator needs "
        ">= 7.35, so each framework runs from its own virtualenv (each is a set of subprocesses anyway).",
        "* Reproduce: `make bench` (creates `.venv-bench` from `benchmarks/requirements.txt` when missing). "
        "`benchmarks/run.sh --only quickstart` runs one workload.",
        "",
        "### What runs",
        "",
        "One manifest per workload drives both frameworks, so they train the same model on the same data: "
        f"`{rel(MANIFESTS / 'quickstart.yaml')}` (a copy of `examples/quickstart.yaml`) and "
        f"`{rel(MANIFESTS / 'mlp4m.yaml')}` (the same task, hidden layers [2048, 2048]). Task: scikit-learn's "
        "bundled digits scaled to [0, 1], 80/20 stratified split with seed 0, the training part split IID "
        "over 10 clients, all 10 clients in every round, FedAvg weighted by sample count, 2 local epochs of "
        "SGD (batch 16, learning rate 0.1, momentum 0.9: the quickstart's values), central evaluation of "
        "the global model on the held-out 20% after every round. The Flower app reproduces Federator's "
        "split, partition and initial weights (same seed, same layer order).",
        "",
        "* **Federator**: `federator run MANIFEST --out DIR --quiet`: one server and the manifest's 2 worker "
        "processes over gRPC on 127.0.0.1 (each takes a batch of its fair share of a round's tasks at once, "
        "the model sent once, trains them one after another and uploads each update while it trains the "
        "next: `docs/scaling.md`, batches and leases); numbers from `DIR/metrics.json`.",
        "* **Flower**: its deployment runtime. `flower-superlink --insecure` on 127.0.0.1, then one "
        "`flower-supernode --insecure` per client (10 SuperNodes; `--node-config partition-id=i "
        "num-partitions=10`), then `flwr run benchmarks/flower-app` "
        "against that SuperLink (a connection in a private `FLWR_HOME`). The app (`benchmarks/flower-app`, "
        "written by hand since `flwr new` downloads its templates) has a ServerApp with `FedAvg` "
        "(`fraction_train=1`, no federated evaluation, central evaluation through `evaluate_fn`) and a "
        "ClientApp that trains. One SuperNode per client is Flower's model of a deployment (a SuperNode is "
        "one node with one `node_config`); on 2 cores that means 10 SuperNodes (plus their SuperExecs) and "
        "10 ClientApp processes per round sharing the cores, each ClientApp with one torch thread. "
        "Offline settings: `--disable-runtime-dependency-installation` (else the SuperLink runs `uv sync`), "
        "`FLWR_TELEMETRY_ENABLED=0`, `FLWR_DISABLE_UPDATE_CHECK=1`. This is the *default deployment*; "
        "flwr 1.41 offers no faster setting for it: the SuperNode's 3 s idle poll "
        "(`flwr/supernode/start_client_internal.py`, `time.sleep(3)`) and the ServerApp's 3 s reply poll are "
        "hard-coded, and `--isolation process` only moves the per-message ClientApp processes into a "
        "separately run SuperExec.",
        "* **Flower, start_server**: Flower's `start_server` / `start_client` gRPC API (deprecated, shipped "
        "in flwr 1.41; `benchmarks/flower-app/flower_bench/legacy.py`): one server process with the legacy "
        "`FedAvg` (`fraction_fit=1`, central evaluation through `evaluate_fn`) and 10 long-lived client "
        "processes (`NumPyClient`, one torch thread each) that keep torch and their partition loaded; the "
        "server pushes instructions over open gRPC streams, so nothing polls. The fastest Flower "
        "configuration of separate processes, and the one the overhead goal is judged against.",
        f"* **Transport**: Flower {v.get('flower.flwr', '?')}'s SuperNodes no longer speak gRPC: its Fleet, "
        "Control and Runtime APIs are protobuf messages over HTTP/1.1 (FastAPI/uvicorn servers, httpx "
        "clients); the SuperLink keeps gRPC only behind an internal compatibility switch that its SuperNode "
        "cannot use. So the Flower numbers are its deployment runtime as shipped, over HTTP on loopback.",
        "* **Rounds**: Federator and Flower's start_server run every round of the manifest. A round of "
        "Flower's default deployment costs about a minute here (see below), so it runs only the first "
        "rounds (quickstart 4, mlp4m 2; `--flower-rounds all` "
        "runs all of them), enough to pass 0.90 accuracy. Per-round statistics of all three are "
        "taken over the rounds all ran; time to accuracy and start-up do not depend on it. Both train "
        "deterministically (same data, initial weights, seeds): accuracies per round differ only through "
        "the clients' shuffling seeds.",
        "",
        "Definitions (the same for both):",
        "",
        "* *round*: from the moment the server starts the round (Flower: `configure_train`) until the "
        "central evaluation of the new global model is done;",
        "* *local training*: the critical path of the clients' training loops in that round. Federator: "
        "the largest of its workers' summed per-task training seconds. Flower (both): the longest `fit` (the "
        "ClientApp times its training loop; it warms torch up at import, so that one-off cost of a fresh "
        "process counts as overhead, not training). With 10 ClientApps on 2 cores, a Flower `fit` also "
        "waits for CPU taken by the other ClientApps' start-up, which inflates Flower's training time and "
        "deflates its overhead: the ratio below is conservative in Flower's favour;",
        "* *framework overhead* = round - local training: dispatch, serialisation, transfer, aggregation, "
        "evaluation and waiting;",
        "* *start-up*: from launching the first process (harness clock) until round 1 starts; *time to "
        f"{TARGET_ACCURACY:.2f}*: from the start of round 1 to the end of the first round whose central "
        "test accuracy is at least 0.90 (and the same plus start-up, from launch).",
        "",
    ]
    for w in (quick, big):
        if w is None:
            continue
        layers = "-".join(str(n) for n in [64, *w.spec["model"]["hiddenSizes"], 10])
        any_run = w.federator or w.flower
        params = f", {any_run.model_parameters:,} parameters" if any_run else ""
        out += [f"### {w.name} (MLP {layers}{params}, {w.spec['rounds']} rounds in the manifest)", ""]
        out += comparison_table(w)
        out.append("")
        if w is quick:
            ok = overhead_goal(w)
            fastest = fastest_flower(w)
            fo = _get(w.federator, lambda r: r.median(lambda x: x.overhead_seconds))
            lo = _get(fastest, lambda r: r.median(lambda x: x.overhead_seconds))
            which = "n/a" if fastest is None else fastest.framework
            out += [
                f"Goal, Federator's overhead per round at most {OVERHEAD_GOAL:g} x the fastest Flower's ({which}): "
                f"{verdict(ok)}, Federator / fastest Flower = {ratio(fo, lo)}.",
                "",
            ]
        else:
            ok = overhead_goal(w)
            out += [f"Overhead per round, Federator / fastest Flower: {verdict(ok)} against the {OVERHEAD_GOAL:g}x "
                    "goal.", ""]
            lines, _ = transfer_rows(w)
            out += ["Whole-round overhead against the loopback limit:", "", *lines, ""]
            out += [
                "This overhead also holds aggregation, central evaluation and the checkpoint of every round, "
                f"and training that competes with transfers for the 2 cores. The {TRANSFER_GOAL:g}x transfer "
                "goal is judged on the transfer alone, timed in the next section (`transfer.py`).",
                "",
            ]
        for e in w.errors:
            out += [f"> {e}", ""]
    flower_rows = [line for w in workloads for line in flower_breakdown(w)]
    if flower_rows:
        out += [
            "### Where a Flower round goes (medians over rounds)",
            "",
            "| workload | round start -> first / last ClientApp process | ClientApp process start-up "
            "(imports, torch warm-up) | training (critical path) | last `fit` done -> replies at the "
            "ServerApp | aggregation + central evaluation |",
            "|---|---:|---:|---:|---:|---:|",
            *flower_rows,
            "",
            "Every message starts a new `flwr-clientapp` process that imports flwr, torch and the app "
            "(about 7 CPU-seconds each; ten of them share 2 cores every round); an idle SuperNode polls the "
            "SuperLink for messages every 3 s and the ServerApp polls for replies every 3 s "
            "(`Grid.send_and_receive`), both hard-coded in flwr 1.41 (its SuperExec polls every 1 s, "
            "`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`). These, not the bytes, make up the default deployment's "
            "overhead, even for the 17 MB model; Flower's start_server configuration has neither.",
            "",
        ]
    out += [
        "### Plots",
        "",
        f"![accuracy against wall time since launch]({docs_rel(PLOT_ACCURACY)})",
        "",
        f"![framework overhead per round]({docs_rel(PLOT_OVERHEAD)})",
        "",
        "### Per round",
        "",
    ]
    for w in workloads:
        out += [f"{w.name}:", "", *per_round_table(w), ""]
    out += [
        "### Caveats",
        "",
        "* The machine has 2 cores and is shared: the CPU use of other processes just before each launch "
        "is in the tables. The script waits (up to a bound) for a quiet machine before each run; medians "
        "are the headline numbers because a busy neighbour hits single rounds.",
        "* One run per framework and workload; expect run-to-run noise of tens of percent on single "
        "rounds. The raw numbers of this run are in `results/bench-flower/summary.json`.",
        "* Flower's simulation engine (Ray) would avoid the per-message processes and polling but is not "
        "its deployment runtime; it was not used.",
        SECTION_END,
    ]
    return "\n".join(out) + "\n"


def plot(workloads: list[Workload]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"Federator": "#1f77b4", "Flower": "#d62728", LEGACY: "#ff7f0e"}
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.2), squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        for run in (w.federator, w.flower, w.flower_legacy):
            if run is None:
                continue
            xs = [run.startup_seconds + r.elapsed_seconds for r in run.rounds]
            ys = [r.accuracy for r in run.rounds]
            ax.plot(xs, ys, marker="o", ms=3, label=run.framework, color=colors[run.framework])
            ax.axvline(run.startup_seconds, color=colors[run.framework], ls=":", lw=1)
        ax.axhline(TARGET_ACCURACY, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"{w.name}: test accuracy (dotted: round 1 starts)")
        ax.set_xlabel("seconds since launch (log scale)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(PLOT_ACCURACY, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.2), squeeze=False)
    width = 0.28
    for ax, w in zip(axes[0], workloads, strict=True):
        for k, run in enumerate((w.federator, w.flower, w.flower_legacy)):
            if run is None:
                continue
            xs = [r.round + (k - 1) * width for r in run.rounds]
            overhead = [max(1e-3, r.overhead_seconds) for r in run.rounds]
            train = run.median(lambda x: x.train_seconds)
            label = f"{run.framework} (median local training {train:.2f} s)"
            ax.bar(xs, overhead, width, color=colors[run.framework], label=label)
        ax.set_yscale("log")
        ax.set_title(f"{w.name}: framework overhead per round")
        ax.set_xlabel("round")
        ax.set_ylabel("round - local training, seconds (log scale)")
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT_OVERHEAD, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def measure(args: argparse.Namespace) -> tuple[list[Workload], dict[str, Any], float]:
    """Run every workload with both frameworks; returns the workloads, the environment and the seconds taken."""
    bench_bin = args.bench_venv / "bin"
    started_at = time.time()
    env = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "memory_gib": memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions(bench_bin / "python"),
    }
    names = args.only or ["quickstart", "mlp4m"]
    workloads = [
        Workload(name, MANIFESTS / f"{name}.yaml", load_spec(MANIFESTS / f"{name}.yaml", sys.executable))
        for name in names
    ]
    for w in workloads:
        out = args.out / w.name
        if w.name == "mlp4m":
            hidden = list(w.spec["model"]["hiddenSizes"])
            # float32 weights and biases of the MLP (64 inputs, 10 classes): the loopback payload
            params = sum((a + 1) * b for a, b in zip([64, *hidden], [*hidden, 10], strict=True))
            w.loopback_samples = loopback_transfer_seconds(4 * params)
            w.loopback_bytes_per_second = 4 * params / min(w.loopback_samples)
            print(f"[{w.name}] loopback: {w.loopback_bytes_per_second / 1e9:.2f} GB/s", flush=True)
        if "federator" not in args.skip:
            print(f"[{w.name}] Federator ...", flush=True)
            try:
                w.federator = run_federator(
                    args.federator, w.manifest, out / "federator", args.timeout, args.quiet_wait
                )
                print(f"[{w.name}] Federator: {summary_line(w.federator)}", flush=True)
            except (BenchError, OSError, KeyError, ValueError) as exc:
                w.errors.append(f"Federator did not produce results: {exc}")
                print(f"[{w.name}] Federator failed: {exc}", flush=True)
        if "flower" not in args.skip:
            print(f"[{w.name}] Flower ...", flush=True)
            try:
                cap = None if args.flower_rounds == "all" else FLOWER_ROUNDS.get(w.name)
                if args.flower_rounds not in ("all", "auto"):
                    cap = int(args.flower_rounds)
                w.flower = run_flower(bench_bin, w.spec, out / "flower", args.timeout, args.quiet_wait, cap)
                w.flower.workload = w.name
                if "incomplete" in w.flower.details:
                    w.errors.append(f"Flower: {w.flower.details['incomplete']}")
                print(f"[{w.name}] Flower: {summary_line(w.flower)}", flush=True)
            except (BenchError, OSError, KeyError, ValueError, subprocess.TimeoutExpired) as exc:
                w.errors.append(f"Flower did not produce results: {exc}")
                print(f"[{w.name}] Flower failed: {exc}", flush=True)
        if "flower-legacy" not in args.skip:
            print(f"[{w.name}] {LEGACY} ...", flush=True)
            try:
                w.flower_legacy = run_flower_legacy(bench_bin, w.spec, out / "flower-legacy", args.timeout,
                                                    args.quiet_wait)
                w.flower_legacy.workload = w.name
                if "incomplete" in w.flower_legacy.details:
                    w.errors.append(f"{LEGACY}: {w.flower_legacy.details['incomplete']}")
                print(f"[{w.name}] {LEGACY}: {summary_line(w.flower_legacy)}", flush=True)
            except (BenchError, OSError, KeyError, ValueError, subprocess.TimeoutExpired) as exc:
                w.errors.append(f"{LEGACY} did not produce results: {exc}")
                print(f"[{w.name}] {LEGACY} failed: {exc}", flush=True)
        runs = [r for r in (w.federator, w.flower, w.flower_legacy) if r is not None]
        if len(runs) > 1:  # per-round statistics over the rounds every framework ran
            common = min(len(r.rounds) for r in runs)
            for r in runs:
                r.stats_rounds = common
    return workloads, env, time.time() - started_at


def save_summary(path: Path, workloads: list[Workload], env: dict[str, Any], elapsed: float) -> None:
    summary = {
        "environment": env,
        "elapsed_seconds": elapsed,
        "workloads": [
            {
                "name": w.name,
                "manifest": str(w.manifest.relative_to(ROOT)),
                "spec": w.spec,
                "loopback_bytes_per_second": w.loopback_bytes_per_second,
                "loopback_seconds": w.loopback_samples,
                "errors": w.errors,
                "runs": {run.framework: asdict(run) for run in (w.federator, w.flower, w.flower_legacy)
                         if run is not None},
            }
            for w in workloads
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))


def load_summary(path: Path) -> tuple[list[Workload], dict[str, Any], float]:
    """The inverse of :func:`save_summary`, to re-render the report without measuring again."""
    summary = json.loads(path.read_text())
    workloads = []
    for item in summary["workloads"]:
        w = Workload(item["name"], ROOT / item["manifest"], item["spec"])
        w.loopback_bytes_per_second = item["loopback_bytes_per_second"]
        w.loopback_samples = item["loopback_seconds"]
        w.errors = item["errors"]
        for name, raw in item["runs"].items():
            run = Run(**{**raw, "rounds": [Round(**r) for r in raw["rounds"]]})
            if name == "Federator":
                w.federator = run
            elif name == LEGACY:
                w.flower_legacy = run
            else:
                w.flower = run
        workloads.append(w)
    return workloads, summary["environment"], float(summary["elapsed_seconds"])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["quickstart", "mlp4m"], action="append", help="run only these workloads")
    ap.add_argument("--skip", choices=["federator", "flower", "flower-legacy"], action="append", default=[])
    ap.add_argument("--federator", type=Path, default=Path(sys.executable).parent / "federator")
    ap.add_argument("--bench-venv", type=Path, default=ROOT / ".venv-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench-flower")
    ap.add_argument("--timeout", type=float, default=480.0, help="limit for one framework run, seconds")
    ap.add_argument("--quiet-wait", type=float, default=20.0, help="wait up to this long for an idle CPU")
    ap.add_argument(
        "--flower-rounds",
        default="auto",
        help="Flower runs only the first N rounds of each manifest: auto (quickstart 4, mlp4m 2), all, or N",
    )
    ap.add_argument("--no-doc", action="store_true", help="leave docs/ alone; results go to --out only")
    ap.add_argument(
        "--render-only", action="store_true", help="measure nothing: rewrite the report from OUT/summary.json"
    )
    args = ap.parse_args(argv)

    summary_path = args.out / "summary.json"
    if args.render_only:
        workloads, env, elapsed = load_summary(summary_path)
    else:
        workloads, env, elapsed = measure(args)
        save_summary(summary_path, workloads, env, elapsed)
    section = render(workloads, env, elapsed)
    (args.out / "section.md").write_text(section)
    if not args.no_doc:
        plot(workloads)
        write_section(section, SECTION_BEGIN, SECTION_END)
        print(f"wrote {DOC.relative_to(ROOT)}, {PLOT_ACCURACY.relative_to(ROOT)}, {PLOT_OVERHEAD.relative_to(ROOT)}")
    print(f"raw numbers in {summary_path} ({elapsed / 60:.1f} min)")
    return 0 if all(not w.errors for w in workloads) else 1


def summary_line(run: Run) -> str:
    t = run.time_to(TARGET_ACCURACY)
    return (
        f"round {run.median(lambda r: r.round_seconds):.2f} s, train {run.median(lambda r: r.train_seconds):.2f} s, "
        f"overhead {run.median(lambda r: r.overhead_seconds):.2f} s (medians), start-up {run.startup_seconds:.1f} s, "
        f"to {TARGET_ACCURACY:.2f}: {fmt_s(t)}, final accuracy {run.rounds[-1].accuracy:.4f}"
    )


if __name__ == "__main__":
    sys.exit(main())
