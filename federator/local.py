"""`federator run`: the same Federation manifest on this machine, with no cluster.

Starts one server process and `clients.workers` worker processes on 127.0.0.1 (real gRPC between real
processes, as in the cluster), follows the server's /status with a progress bar, and leaves a results
folder: metrics.json, accuracy.png, loss.png, model.pt and the processes' logs. On Linux the processes are
forks of this one, made after it imported torch and the runtime and loaded the data (federator.forking),
so that those seconds are paid once and not three times.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federator import forking, tokens
from federator.api.manifest import ManifestError, load_federation
from federator.api.models import Federation
from federator.preflight import check_federation
from federator.runtime import lifeline
from federator.runtime.statelock import StateDirLocked, ensure_unlocked

STATE = "state"
LAST_ERROR_FILE = "last-error"  # written by the server (federator/runtime/server.py) when it fails
CHECKPOINT_FILE = "checkpoint.pt"
# what the server and the workers import (torch, numpy, grpc...), imported once by `federator run` before it
# forks them; importing grpc starts none of its threads (a channel or server would, and neither exists here)
PRELOAD = ("federator.runtime.server", "federator.runtime.client")

Child = subprocess.Popen[bytes] | forking.ForkedChild


@dataclass
class LocalRun:
    """The processes of one local federation and where they write."""

    manifest: Path
    fed: Federation
    out: Path
    workers: int
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    silo_tokens: dict[str, str] = field(default_factory=dict)  # silo name -> its token, for silo clients
    linger_seconds: float = 15.0  # the server's --linger-seconds (-1: serve until stopped, as in a cluster)
    fork: bool = False  # start the children as forks of this process (federator.forking), not new interpreters
    server: Child | None = None
    clients: list[Child] = field(default_factory=list)
    grpc_port: int = 0
    http_port: int = 0
    launched_at: float = 0.0
    _logs: list[Any] = field(default_factory=list)
    _lifeline: tuple[dict[str, str], int, int] | None = None  # children stop when this process dies

    @property
    def state_dir(self) -> Path:
        return self.out / STATE

    def _env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(extra)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str]) -> Child:
        log = open(self.out / log_name, "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        if self._lifeline is None:
            self._lifeline = lifeline.child_env_and_fds()
        lifeline_env, read_fd, _ = self._lifeline
        if self.fork and forking.can_fork():
            from federator.cli import main

            return forking.fork_call(lambda: main(args), args, log.fileno(), {**env, **lifeline_env},
                                     keep_fds=(read_fd,), name=f"fed-{log_name.removesuffix('.log')}")
        # a session of their own: Ctrl-C reaches only this process, which then stops them in order
        return subprocess.Popen([sys.executable, "-m", "federator", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**env, **lifeline_env}, start_new_session=True, pass_fds=(read_fd,))

    def preload(self) -> None:
        """With `fork`: import what the children need, and load and split the data, here and once; the forks
        share both (copy-on-write) instead of each doing it again. No torch operation runs here: a fork of a
        process whose thread pools had started would inherit them broken."""
        if not self.fork:
            return
        for name in PRELOAD:
            importlib.import_module(name)
        from federator.runtime.data import prepare_data

        with contextlib.suppress(Exception):  # the server meets the same error and reports it, as without a fork
            prepare_data(self.fed.spec)

    def reserve_ports(self) -> None:
        """Pick the server's free ports up front, so that the workers can start (and warm up) while the
        server starts, instead of after it."""
        if self.grpc_port and self.http_port:
            return
        with socket.socket() as a, socket.socket() as b:  # both bound at once: two different ports
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.1", 0))
            self.grpc_port = self.grpc_port or int(a.getsockname()[1])
            self.http_port = self.http_port or int(b.getsockname()[1])

    def start_server(self, timeout: float = 120.0) -> None:
        self.spawn_server()
        self.wait_for_server(timeout)

    def spawn_server(self) -> None:
        ready = self.state_dir / "ready"
        ready.unlink(missing_ok=True)
        self.server = self._spawn(
            ["server", "--config", str(self.manifest), "--host", "127.0.0.1",
             "--port", str(self.grpc_port), "--metrics-port", str(self.http_port),
             "--state-dir", str(self.state_dir), "--ready-file", str(ready),
             "--linger-seconds", str(self.linger_seconds)],
            "server.log", self._env(FEDERATOR_TOKENS=tokens.dumps(tokens.Tokens((self.token,), self.silo_tokens))),
        )

    def wait_for_server(self, timeout: float = 120.0) -> None:
        assert self.server is not None
        ready = self.state_dir / "ready"
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.server.poll() is not None:
                raise RuntimeError(self.server_failure())
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout:.0f}s; see {self.out}/server.log")
            time.sleep(0.05)
        g, h = ready.read_text().split()
        self.grpc_port, self.http_port = int(g), int(h)

    def start_clients(self) -> None:
        threads = max(1, (os.cpu_count() or 1) // max(1, self.workers))
        for i in range(self.workers):
            self.clients.append(self._spawn(
                ["client", "--server", f"127.0.0.1:{self.grpc_port}", "--config", str(self.manifest),
                 "--name", f"worker-{i}", "--metrics-port", "-1", "--threads", str(threads)],
                f"worker-{i}.log", self._env(FEDERATOR_TOKEN=self.token,
                                             FEDERATOR_RESIDUAL_DIR=str(self.out / "residuals")),
            ))

    def server_failure(self) -> str:
        """The server's own one-line reason for exiting with an error (its last-error file, else the last
        line of its log), and where its log is."""
        assert self.server is not None
        code = self.server.returncode
        reason = f"the server was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else ""
        with contextlib.suppress(OSError):
            reason = reason or (self.state_dir / LAST_ERROR_FILE).read_text().strip()
        if not reason:
            with contextlib.suppress(OSError):
                lines = [ln for ln in (self.out / "server.log").read_text(errors="replace").splitlines() if ln.strip()]
                reason = lines[-1].strip() if lines else ""
        return f"{reason or f'the server exited with code {code}'} (log: {self.out}/server.log)"

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/status", timeout=2) as resp:
                doc: dict[str, Any] = json.load(resp)
                return doc
        except OSError:
            return None

    def wait_clients(self, timeout: float) -> bool:
        """Give the workers `timeout` seconds to exit by themselves (after the server's STOP)."""
        deadline = time.monotonic() + timeout
        for p in self.clients:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self, grace: float = 5.0) -> None:
        procs = [p for p in [self.server, *self.clients] if p is not None and p.poll() is None]
        for p in procs:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(p, signal.SIGKILL)
                p.wait()
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self._lifeline is not None:
            for fd in self._lifeline[1:]:
                os.close(fd)
            self._lifeline = None


def _signal(p: Child, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)


def follow(run: LocalRun, quiet: bool) -> dict[str, Any] | None:
    """Follow the server's /status until it exits; show progress. Returns the last status seen.

    With `quiet`, one line per completed round, read from the server's metrics.json, so that rounds
    faster than the polling interval are not skipped.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    rounds = run.fed.spec.rounds
    last: dict[str, Any] | None = None
    printed = 0
    assert run.server is not None
    # this process idles while the rounds run: import the plotting library then, not after the last round
    # (most of a second); not before round 1, when the server and the workers need the CPU
    plotting = threading.Thread(target=importlib.import_module, args=("federator.plots",), daemon=True)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, disable=quiet, transient=False,
    ) as progress:
        task = progress.add_task(run.fed.metadata.name, total=rounds, info="starting")
        while True:
            running = run.server.poll() is None
            st = run.status() if running else None
            if st is not None:
                last = st
                progress.update(task, completed=st["round"], info=_info(st))
                if st["round"] >= 1 and plotting.ident is None:
                    plotting.start()
            if quiet:
                printed = _print_new_rounds(run, printed, rounds)
            if not running:
                break
            time.sleep(0.2)
        if last is not None and run.server.returncode == 0:
            progress.update(task, completed=last.get("round", 0))
    return last


def _print_new_rounds(run: LocalRun, printed: int, rounds: int) -> int:
    try:
        records = json.loads((run.state_dir / "metrics.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return printed
    for r in records:
        if r["round"] > printed:
            print(f"round {r['round']}/{rounds}  acc {r['accuracy']:.3f}  loss {r['loss']:.3f}  "
                  f"{r['participants']} updates  {r['round_seconds']:.2f}s", flush=True)
            printed = r["round"]
    return printed


def _info(st: dict[str, Any]) -> str:
    acc, loss = st.get("accuracy"), st.get("loss")
    parts = [st["phase"].lower()]
    if acc is not None:
        parts.append(f"acc {acc:.3f}")
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    parts.append(f"{st['clients']['participants']} updates/round  {st['clients']['connected']} connected")
    if st.get("warning"):
        parts.append(f"[yellow]warning: {st['warning']}[/yellow]")
    return "  ".join(parts)


def write_results(run: LocalRun) -> dict[str, Any]:
    """metrics.json with start-up time, plots, and the final model in the results folder."""
    doc: dict[str, Any] = json.loads((run.state_dir / "metrics.json").read_text())
    rounds = doc["rounds"]
    first_start = rounds[0]["started_at"] if rounds else time.time()
    for r in rounds:
        r["elapsed_seconds"] = r["ended_at"] - first_start
    doc["startup_seconds"] = max(0.0, first_start - run.launched_at)
    doc["total_seconds"] = time.time() - run.launched_at
    (run.out / "metrics.json").write_text(json.dumps(doc, indent=2))
    if (run.state_dir / "model.pt").exists():
        shutil.copyfile(run.state_dir / "model.pt", run.out / "model.pt")
    from federator.plots import plot_anomaly_scores, plot_curves

    plot_curves(rounds, run.out, title=run.fed.metadata.name)
    plot_anomaly_scores(rounds, run.out, title=run.fed.metadata.name)
    return doc


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _interrupt_on_signals() -> dict[int, Any]:
    """Ctrl-C and SIGTERM stop the run and every process it started.

    Set explicitly: a shell starts background jobs with SIGINT ignored, and Python then leaves it
    ignored, so `federator run ... &` followed by `kill -INT` would otherwise orphan the workers. SIGHUP
    (the terminal closed) is handled the same way.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, _raise_interrupt)
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def run_local(manifest: Path, out: Path, workers: int | None = None, resume: bool = False,
              quiet: bool = False) -> int:
    fed = load_federation(manifest)
    try:
        ensure_unlocked(out / STATE)  # before anything is deleted: it may be a live run's
    except StateDirLocked as exc:
        print(f"federation {fed.metadata.name}: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(out / STATE, ignore_errors=True)
        shutil.rmtree(out / "residuals", ignore_errors=True)  # error feedback of the previous run's clients
        for name in ("metrics.json", "accuracy.png", "loss.png", "anomaly.png", "bytes.png", "model.pt",
                     "server.log"):
            (out / name).unlink(missing_ok=True)
        for old in out.glob("worker-*.log"):
            old.unlink()
    (out / STATE).mkdir(exist_ok=True)
    run = LocalRun(manifest=manifest, fed=fed, out=out, workers=workers or fed.spec.clients.workers,
                   fork=forking.can_fork())
    if fed.spec.byzantine.attack is not None:  # experiments only: say loudly who misbehaves
        from federator.runtime.aggregation.attacks import attack_banner

        print(attack_banner(fed.spec), file=sys.stderr)
    run.launched_at = time.time()
    interrupted = False
    previous = _interrupt_on_signals()
    try:
        run.reserve_ports()
        run.preload()
        run.spawn_server()
        run.start_clients()  # they warm up while the server starts, and join as soon as it listens
        run.wait_for_server()
        last = follow(run, quiet)
        if run.server is not None and run.server.returncode == 0:
            run.wait_clients(10.0)  # they got STOP; let them leave cleanly before anything is signalled
    except KeyboardInterrupt:
        interrupted = True
        last = None
    except RuntimeError as exc:
        run.stop()
        print(f"federation {fed.metadata.name} could not start: {exc}", file=sys.stderr)
        return 1
    finally:
        run.stop()
        _restore_signals(previous)
    resume_cmd = f"federator run {manifest} --out {out} --resume"
    if interrupted:
        print(f"interrupted; every process stopped. Resume with: {resume_cmd}", file=sys.stderr)
        return 130
    assert run.server is not None
    if run.server.returncode != 0:
        reason = run.server_failure()
        said = (last or {}).get("message")
        if said and not (run.state_dir / LAST_ERROR_FILE).exists():
            reason = f"{said} (log: {out}/server.log)"
        print(f"federation {fed.metadata.name} failed: {reason}", file=sys.stderr)
        if (run.state_dir / CHECKPOINT_FILE).exists():
            print(f"completed rounds are kept; once fixed, continue with: {resume_cmd}", file=sys.stderr)
        return 1
    doc = write_results(run)
    final = doc["rounds"][-1] if doc["rounds"] else {}
    print(f"{fed.metadata.name}: {len(doc['rounds'])} rounds, accuracy {final.get('accuracy', float('nan')):.4f}, "
          f"loss {final.get('loss', float('nan')):.4f}, {doc['total_seconds']:.1f}s; results in {out}/")
    return 0


def main(args: argparse.Namespace) -> int:
    manifest = Path(args.manifest)
    try:
        fed = load_federation(manifest)
    except FileNotFoundError:
        print(f"{manifest}: file not found", file=sys.stderr)
        return 2
    except ManifestError as exc:
        for p in exc.problems:
            print(f"{manifest}: {p}", file=sys.stderr)
        return 2
    problems = check_federation(fed)
    if problems:
        for p in problems:
            print(f"{manifest}: {p}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("results") / fed.metadata.name
    return run_local(manifest, out, workers=args.workers, resume=args.resume, quiet=args.quiet)
