"""Whole federations on this machine: real server and worker processes talking gRPC on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from federator import tokens
from federator.api.manifest import load_federation
from federator.local import LocalRun, write_results
from federator.runtime.transport import RECONNECT_BACKOFF_MAX
from tests.helpers.manifests import manifest, write_manifest
from tests.helpers.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def federator(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "federator", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_quickstart_reaches_093_and_leaves_results(tmp_path: Path) -> None:
    out = tmp_path / "quickstart"
    done = federator("run", "examples/quickstart.yaml", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]

    doc = json.loads((out / "metrics.json").read_text())
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 16))
    assert rounds[-1]["accuracy"] >= 0.93
    assert all(r["participants"] == 10 for r in rounds)
    assert doc["startup_seconds"] > 0 and rounds[-1]["elapsed_seconds"] > 0
    for plot in ("accuracy.png", "loss.png", "bytes.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = torch.load(out / "model.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in model.items()} == {
        "1.weight": (64, 64), "1.bias": (64,), "3.weight": (10, 64), "3.bias": (10,)}
    assert "round 15/15" in done.stdout and "accuracy" in done.stdout
    assert "round 15/15" in (out / "server.log").read_text()


def test_dirichlet_non_iid_reaches_085(tmp_path: Path) -> None:
    doc = manifest(
        rounds=20,
        model={"name": "mlp", "hiddenSizes": [64]},
        data={"dataset": "digits", "partition": {"scheme": "dirichlet", "alpha": 0.5}, "seed": 1},
        training={"localEpochs": 2, "batchSize": 16, "learningRate": 0.05, "momentum": 0.9},
        clients={"count": 10, "perRound": 10, "minPerRound": 8, "workers": 2},
    )
    path = write_manifest(tmp_path / "noniid.yaml", doc)
    done = federator("run", str(path), "--out", str(tmp_path / "out"), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = json.loads((tmp_path / "out" / "metrics.json").read_text())["rounds"]
    assert rounds[-1]["accuracy"] >= 0.85


def _status(run: LocalRun) -> dict[str, Any]:
    return run.status() or {}


def test_worker_killed_mid_round_the_run_still_finishes(tmp_path: Path) -> None:
    doc = manifest(rounds=6, training={"localEpochs": 3, "batchSize": 8},
                   clients={"count": 6, "perRound": 6, "minPerRound": 6, "roundTimeoutSeconds": 60, "workers": 2})
    path = write_manifest(tmp_path / "fed.yaml", doc)
    run = LocalRun(manifest=path, fed=load_federation(path), out=tmp_path, workers=2)
    (tmp_path / "state").mkdir()
    run.launched_at = time.time()
    try:
        run.start_server()
        run.start_clients()
        # both workers joined (under load one may still be importing torch while the other trains), and
        # round 2 under way: then the victim holds a task
        wait_for(lambda: (st := _status(run)).get("round", 0) >= 1 and bool(st.get("roundStartedAt"))
                 and st.get("clients", {}).get("connected") == 2, 120, "both workers in round 2")
        victim = run.clients[0]
        os.kill(victim.pid, signal.SIGKILL)  # mid-round: both workers are busy with their tasks
        assert run.server is not None
        run.server.wait(180)
        assert run.server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        run.stop()
    assert victim.returncode == -signal.SIGKILL
    rounds = json.loads((tmp_path / "state" / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 7))
    # minPerRound == perRound: every round got all six updates, so the dead worker's task was reassigned
    assert all(r["participants"] == 6 for r in rounds)
    assert "stopped responding; requeueing" in (tmp_path / "server.log").read_text()


def test_server_killed_resumes_from_checkpoint_without_losing_or_repeating_rounds(tmp_path: Path) -> None:
    doc = manifest(rounds=8, clients={"count": 4, "perRound": 4, "minPerRound": 4, "workers": 2})
    path = write_manifest(tmp_path / "fed.yaml", doc)
    run = LocalRun(manifest=path, fed=load_federation(path), out=tmp_path, workers=2)
    (tmp_path / "state").mkdir()
    run.launched_at = time.time()
    try:
        run.start_server()
        run.start_clients()
        wait_for(lambda: _status(run).get("round", 0) >= 3, 120, "three rounds")
        assert run.server is not None
        os.kill(run.server.pid, signal.SIGKILL)
        run.server.wait(10)
        before = json.loads((tmp_path / "state" / "metrics.json").read_text())["rounds"]
        assert len(before) >= 3
        run.start_server()  # same ports and state dir; the workers reconnect by themselves
        run.server.wait(180)
        assert run.server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
        doc_out = write_results(run)
        # both got STOP from the restarted server: a worker that did not find it again would still be retrying
        clean = run.wait_clients(30)
    finally:
        run.stop()
    rounds = doc_out["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 9))  # none lost, none repeated
    assert rounds[: len(before)] == [dict(r, elapsed_seconds=rounds[i]["elapsed_seconds"])
                                     for i, r in enumerate(before)]
    log = (tmp_path / "server.log").read_text()
    assert f"resumed from checkpoint: {len(before)} of 8 rounds completed" in log
    assert clean and all(p.returncode == 0 for p in run.clients), (
        [p.returncode for p in run.clients], (tmp_path / "worker-0.log").read_text()[-2000:])


def test_server_serves_health_metrics_and_status(tmp_path: Path) -> None:
    doc = manifest(rounds=4)
    path = write_manifest(tmp_path / "fed.yaml", doc)
    run = LocalRun(manifest=path, fed=load_federation(path), out=tmp_path, workers=1)
    (tmp_path / "state").mkdir()
    try:
        run.start_server()
        base = f"http://127.0.0.1:{run.http_port}"
        with urllib.request.urlopen(f"{base}/healthz") as r:
            assert r.status == 200
        pending = json.load(urllib.request.urlopen(f"{base}/status"))
        assert pending["phase"] == "Pending" and pending["round"] == 0 and pending["rounds"] == 4
        assert pending["message"] == "waiting for client workers to join"
        run.start_clients()
        wait_for(lambda: _status(run).get("round", 0) >= 2, 120, "two rounds")
        text = urllib.request.urlopen(f"{base}/metrics").read().decode()
        st = json.load(urllib.request.urlopen(f"{base}/status"))
    finally:
        run.stop()
    labels = 'federation="test",namespace="default"'
    for name in ("federator_round", "federator_rounds_total", "federator_model_accuracy", "federator_model_loss",
                 "federator_clients_connected", "federator_pending_tasks", "federator_bytes_sent_total",
                 "federator_bytes_received_total"):
        assert f"{name}{{{labels}}}" in text, name
    ratios = {s.labels["direction"]: s.value for f in text_string_to_metric_families(text)
              if f.name == "federator_compression_ratio" for s in f.samples}
    assert ratios == {"uplink": 1.0, "downlink": 1.0}  # uncompressed both ways
    assert f'federator_client_updates_total{{{labels},outcome="accepted"}}' in text
    assert "federator_round_duration_seconds_bucket" in text
    assert st["phase"] in ("Running", "Succeeded") and st["round"] >= 2
    assert st["message"] in ("", "completed 4 rounds")  # the waiting reason is gone once rounds run
    assert 0.0 <= st["accuracy"] <= 1.0 and st["clients"]["participants"] == 4


def test_a_cluster_server_keeps_serving_its_result_after_the_last_round(tmp_path: Path) -> None:
    """`--linger-seconds -1` (what the operator runs): after success the server still answers /status and
    tells late workers to STOP, instead of exiting into a pod restart; SIGTERM ends it cleanly."""
    doc = manifest(rounds=2)
    path = write_manifest(tmp_path / "fed.yaml", doc)
    run = LocalRun(manifest=path, fed=load_federation(path), out=tmp_path, workers=1, linger_seconds=-1)
    (tmp_path / "state").mkdir()
    try:
        run.start_server()
        run.start_clients()
        wait_for(lambda: _status(run).get("phase") == "Succeeded", 120, "success")
        assert run.wait_clients(30) and run.clients[0].returncode == 0  # the worker got STOP and left
        time.sleep(RECONNECT_BACKOFF_MAX + 1.5)  # longer than a local server lingers for leaving workers
        assert run.server is not None and run.server.poll() is None
        assert _status(run)["phase"] == "Succeeded" and _status(run)["round"] == 2
        late = run._spawn(["client", "--server", f"127.0.0.1:{run.grpc_port}", "--config", str(path),
                           "--name", "late", "--metrics-port", "-1"], "late.log", run._env(FEDERATOR_TOKEN=run.token))
        assert late.wait(60) == 0  # a worker (re)started after the end is told to stop, not left retrying
        run.server.send_signal(signal.SIGTERM)
        assert run.server.wait(20) == 0
    finally:
        run.stop()


def test_silo_client_trains_on_its_own_data(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    silo_file = tmp_path / "hospital.npz"
    np.savez(silo_file, x=(x[:300] / 16.0).reshape(-1, 1, 8, 8).astype(np.float32), y=y[:300])
    doc = manifest(rounds=4, clients={"count": 2, "perRound": 2, "minPerRound": 2, "workers": 1})
    path = write_manifest(tmp_path / "fed.yaml", doc)
    run = LocalRun(manifest=path, fed=load_federation(path), out=tmp_path, workers=1,
                   silo_tokens={"hospital": "hospital-token"})
    (tmp_path / "state").mkdir()
    with open(tmp_path / "silo.log", "wb") as silo_log:
        try:
            run.start_server()
            silo = subprocess.Popen(
                [sys.executable, "-m", "federator", "client", "--server", f"127.0.0.1:{run.grpc_port}",
                 "--config", str(path), "--silo", "hospital", "--data", str(silo_file), "--format", "npz",
                 "--metrics-port", "-1"],
                env=dict(os.environ, FEDERATOR_TOKEN="hospital-token"), cwd=ROOT, stdout=silo_log,
                stderr=subprocess.STDOUT,
            )
            wait_for(lambda: _status(run).get("silos", {}).get("hospital", {}).get("joined"), 60, "the silo to join")
            run.start_clients()
            assert run.server is not None
            run.server.wait(180)
            silo.wait(30)
        finally:
            run.stop()
    assert run.server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    assert silo.returncode == 0
    final = json.loads((tmp_path / "state" / "metrics.json").read_text())
    assert len(final["rounds"]) == 4
    # two simulated clients and the silo, sampled two per round (seeded): the silo's own updates were aggregated
    assert final["silos"]["hospital"]["roundsParticipated"] >= 1
    assert final["silos"]["hospital"]["lastUpdateTime"] is not None


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _comm(pid: int) -> str:
    return (Path("/proc") / str(pid) / "comm").read_text().strip()


def test_ctrl_c_stops_every_process_and_resume_finishes_the_run(tmp_path: Path) -> None:
    doc = manifest(rounds=40, clients={"count": 4, "perRound": 4, "minPerRound": 4, "workers": 2})
    path = write_manifest(tmp_path / "ctrlc.yaml", doc)
    out = tmp_path / "out"
    # started the way a shell starts a background job (SIGINT ignored, inherited): Ctrl-C must still work
    proc = subprocess.Popen([sys.executable, "-m", "federator", "run", str(path), "--out", str(out), "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("round "):  # the first completed round: the run is under way
            break
    children = set(_processes_mentioning(str(path))) - {proc.pid}
    assert len(children) == 3  # the server and two workers
    # forks of the run (which imported torch once for all three), named for ps -o comm and top
    assert sorted(_comm(pid) for pid in children) == ["fed-server", "fed-worker-0", "fed-worker-1"]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "--resume" in err
    wait_for(lambda: not _processes_mentioning(str(path)), 10, "every child process to exit")

    done = federator("run", str(path), "--out", str(out), "--quiet", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 41))
    assert "resumed from checkpoint" in (out / "server.log").read_text()


def test_kill_9_of_run_leaves_no_process_and_resume_runs_each_round_once(tmp_path: Path) -> None:
    doc = manifest(rounds=30, clients={"count": 4, "perRound": 4, "minPerRound": 4, "workers": 2})
    path = write_manifest(tmp_path / "kill9.yaml", doc)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "federator", "run", str(path), "--out", str(out), "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("round "):
            break
    children = set(_processes_mentioning(str(path))) - {proc.pid}
    assert len(children) == 3  # the server and two workers
    proc.kill()
    proc.wait(10)
    proc.stdout.close()  # (warnings are errors: an unclosed pipe fails the test)
    # they notice the lost parent at once (PR_SET_PDEATHSIG, or EOF on the lifeline pipe) and stop
    wait_for(lambda: not (children & set(_processes_mentioning(str(path)))), 60, "every child process to exit")

    done = federator("run", str(path), "--out", str(out), "--quiet", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 31))
    log = (out / "server.log").read_text()  # both servers' lines: each round completed exactly once
    assert [log.count(f" round {i}/30: ") for i in range(1, 31)] == [1] * 30
    assert "resumed from checkpoint" in log


def test_a_second_server_on_a_state_folder_in_use_refuses(tmp_path: Path) -> None:
    doc = manifest(rounds=2)
    path = write_manifest(tmp_path / "fed.yaml", doc)
    run = LocalRun(manifest=path, fed=load_federation(path), out=tmp_path, workers=1)
    (tmp_path / "state").mkdir()
    try:
        run.reserve_ports()
        run.start_server()  # no workers: it waits for them, holding the folder
        assert run.server is not None
        second = subprocess.run(
            [sys.executable, "-m", "federator", "server", "--config", str(path), "--port", "0", "--metrics-port", "0",
             "--state-dir", str(run.state_dir)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env=dict(os.environ, FEDERATOR_TOKENS=tokens.dumps(tokens.Tokens(("t",)))))
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by process {run.server.pid}" in second.stderr
        assert f"kill {run.server.pid}" in second.stderr
        # and `federator run` on the same folder refuses before deleting anything of the live run
        again = federator("run", str(path), "--out", str(tmp_path))
        assert again.returncode == 2 and f"in use by process {run.server.pid}" in again.stderr
        assert (tmp_path / "server.log").exists() and run.server.poll() is None
        run.server.send_signal(signal.SIGHUP)  # the terminal closed: a clean stop, as on SIGTERM
        assert run.server.wait(60) == 1  # stopped before its rounds were done
        assert f"signal {int(signal.SIGHUP)}: stopping" in (tmp_path / "server.log").read_text()
    finally:
        run.stop()


def test_a_server_failure_is_explained_on_the_console_with_how_to_continue(tmp_path: Path) -> None:
    doc = manifest(rounds=30, clients={"count": 4, "perRound": 4, "minPerRound": 4, "workers": 1})
    path = write_manifest(tmp_path / "fed.yaml", doc)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "federator", "run", str(path), "--out", str(out), "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("round "):
            break
    server = int((out / "state" / "server.lock").read_text())
    os.kill(server, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "failed: the server was killed by SIGKILL" in err
    assert f"continue with: federator run {path} --out {out} --resume" in err

    doc["spec"]["model"]["hiddenSizes"] = [16]  # a checkpoint of the old model cannot be continued with it
    write_manifest(path, doc)
    done = federator("run", str(path), "--out", str(out), "--quiet", "--resume")
    assert done.returncode == 1
    assert "was made for a different model; use a new state directory" in done.stderr
    assert "Traceback" not in done.stderr
