"""Where a quickstart round's time goes: timestamps of every task's steps, from real `federator run`s.

Runs `federator run MANIFEST` for each source tree given (alternating, `--runs` times each), with a
`sitecustomize` module on PYTHONPATH that wraps, in every process, the few functions that mark a task's
steps, and appends their start and end times (time.time(), one clock on one machine) to a JSON-lines
file per process: the worker's task fetch (`Worker._get_task`), local training (`train_local`), the upload
call (`ModelCalls.submit`), and the server's intake of an update (`FederationServer._submit`) and central
evaluation (`evaluate`). Nothing in federator/ is changed for it; the same wrappers fit the tree before
and after the batched protocol.

A round's critical path is the worker whose last training ends last. Its overhead (round minus that
worker's summed training) splits into: dispatch (round start until its first training starts: the parked
GetTask waking, the model's download, per-task set-up), between tasks (gaps between its trainings: task
fetches, uploads not overlapped, set-up), and the tail (its last training's end until the round ends: the
last upload, intake, aggregation and evaluation).

    git archive main federator | tar -x -C /tmp/before     # a tree to compare with
    python benchmarks/round_timeline.py --tree after=. --tree before=/tmp/before --runs 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = r'''
import functools, json, os, threading, time
_path = os.environ.get("FEDERATOR_TIMELINE_DIR")
if _path:
    _lock = threading.Lock()
    _file = open(os.path.join(_path, f"{os.getpid()}.jsonl"), "a", buffering=1)

    def _note(kind, start, end):
        with _lock:
            _file.write(json.dumps({"kind": kind, "start": start, "end": end}) + "\n")

    def _timed(kind, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                _note(kind, start, time.time())
        return wrapper

    from federator.runtime import client as _client
    from federator.runtime import server as _server
    _client.train_local = _timed("train", _client.train_local)
    _client.Worker._get_task = _timed("get_task", _client.Worker._get_task)
    _init = _client.ModelCalls.__init__

    def _calls_init(self, channel):
        _init(self, channel)
        self.submit = _timed("upload", self.submit)
    _client.ModelCalls.__init__ = _calls_init
    _server.FederationServer._submit = _timed("intake", _server.FederationServer._submit)
    _server.evaluate = _timed("evaluate", _server.evaluate)
'''


def run_once(tree: Path, manifest: Path, work: Path, federator: str) -> dict[str, Any]:
    site = work / "site"
    site.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    events = work / "events"
    events.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{site}", "FEDERATOR_TIMELINE_DIR": str(events)}
    out = work / "run"
    # from the tree itself: `python -m federator` (the server and workers) puts the current folder first
    subprocess.run([federator, "run", str(manifest), "--out", str(out), "--quiet"], env=env, check=True, cwd=tree,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    procs: dict[str, list[dict[str, Any]]] = {}
    for f in events.glob("*.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            procs[f.stem] = rows
    return {"rounds": metrics["rounds"], "procs": procs}


def breakdown(run: dict[str, Any]) -> list[dict[str, float]]:
    """Per round (after the first): overhead, dispatch, between tasks, tail, and the critical worker's
    count of tasks, task fetches and upload seconds inside the round."""
    workers = {pid: rows for pid, rows in run["procs"].items() if any(r["kind"] == "train" for r in rows)}
    server = [r for pid, rows in run["procs"].items() if pid not in workers for r in rows]
    out = []
    for rec in run["rounds"][1:]:  # round 1 also pays one-off costs (first step of torch.optim)
        t0, t1 = rec["started_at"], rec["ended_at"]

        def inside(rows: list[dict[str, Any]], kind: str, t0: float = t0, t1: float = t1) -> list[dict[str, Any]]:
            return sorted((r for r in rows if r["kind"] == kind and t0 <= r["start"] < t1), key=lambda r: r["start"])

        trains = {pid: inside(rows, "train") for pid, rows in workers.items()}
        trains = {pid: t for pid, t in trains.items() if t}
        if not trains:
            continue
        crit = max(trains, key=lambda pid: trains[pid][-1]["end"])
        tr = trains[crit]
        gaps = sum(b["start"] - a["end"] for a, b in itertools.pairwise(tr))
        train_sum = sum(r["end"] - r["start"] for r in tr)
        intake = inside(server, "intake")
        evals = inside(server, "evaluate")
        out.append({
            "round_ms": (t1 - t0) * 1e3,
            "overhead_ms": (t1 - t0 - train_sum) * 1e3,
            "dispatch_ms": (tr[0]["start"] - t0) * 1e3,
            "between_ms": gaps * 1e3,
            "between_per_task_ms": gaps / max(1, len(tr) - 1) * 1e3,
            "tail_ms": (t1 - tr[-1]["end"]) * 1e3,
            "tasks": len(tr),
            "fetches": len(inside(workers[crit], "get_task")),
            "intake_ms_per_update": statistics.fmean(r["end"] - r["start"] for r in intake) * 1e3 if intake else 0.0,
            "evaluate_ms": sum(r["end"] - r["start"] for r in evals) * 1e3,
            "upload_ms_per_task": statistics.fmean(
                r["end"] - r["start"] for r in inside(workers[crit], "upload")) * 1e3 if tr else 0.0,
        })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (repeatable)")
    ap.add_argument("--manifest", type=Path, default=ROOT / "benchmarks" / "manifests" / "quickstart.yaml")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--federator", default=str(Path(sys.executable).parent / "federator"))
    args = ap.parse_args(argv)
    trees = [(n, Path(p).resolve()) for n, _, p in (t.partition("=") for t in args.tree)]
    rows: dict[str, list[dict[str, float]]] = defaultdict(list)
    accuracy: dict[str, set[float]] = defaultdict(set)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for name, tree in trees:  # alternating, so both see the same load
                run = run_once(tree, args.manifest, Path(tmp) / f"{name}-{i}", args.federator)
                rows[name] += breakdown(run)
                accuracy[name].add(run["rounds"][-1]["accuracy"])
                load.append(os.getloadavg()[0])
    keys = ["round_ms", "overhead_ms", "dispatch_ms", "between_ms", "between_per_task_ms", "tail_ms", "tasks",
            "fetches", "upload_ms_per_task", "intake_ms_per_update", "evaluate_ms"]
    print(f"medians over rounds 2.. of {args.runs} runs each; load (1 min) {min(load):.1f}-{max(load):.1f}")
    print("| " + " | ".join(["tree", *keys, "final accuracy"]) + " |")
    print("|" + "---|" * (len(keys) + 2))
    for name, _ in trees:
        med = [f"{statistics.median(r[k] for r in rows[name]):.1f}" for k in keys]
        print("| " + " | ".join([name, *med, ", ".join(f"{a:.4f}" for a in sorted(accuracy[name]))]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
