"""Start-up of `federator run`: how long the quickstart takes from launch to results, and where it goes.

    python benchmarks/startup.py [--runs 3] [--manifest examples/quickstart.yaml] [--baseline DIR] [--no-doc]

Runs the manifest end to end `--runs` times (each a fresh results folder), and reports per run the wall
time from launching `federator run` to its exit, the time before round 1 (`startup_seconds` in
metrics.json) and the final accuracy. Then, in single processes, what the server and a worker pay before
they can work: CPU seconds of their imports (`python -X importtime` lists the heaviest), of loading the
data, and of torch's first optimizer step (it imports torch._dynamo). With `--baseline DIR` (another checkout,
e.g. of an older commit) the runs alternate between this tree and that one, so both see the same load,
and the table gives their ratio. Writes its section of
docs/benchmarks.md unless --no-doc. The machine's load (`os.getloadavg`) is printed with the numbers: on a
shared 2-core machine they move with it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docsection import cpu_model, write_section

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- BEGIN startup (written by benchmarks/startup.py; edits here are lost) -->"
END = "<!-- END startup -->"
GOAL_SECONDS = 8.0

PHASES = """
import time, sys
t = time.process_time()
import federator.runtime.server, federator.runtime.client
imports = time.process_time() - t
from federator.runtime.config import load_federation_config
from federator.runtime.data import prepare_data
fed = load_federation_config(sys.argv[1])
t = time.process_time()
prepare_data(fed.spec)
data = time.process_time() - t
import torch
t = time.process_time()
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).step()
step = time.process_time() - t
print(imports, data, step)
"""


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def run_once(manifest: Path, out: Path, tree: Path = ROOT) -> dict[str, float]:
    start = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-m", "federator", "run", str(manifest), "--out", str(out), "--quiet"],
                          cwd=tree, capture_output=True, text=True, timeout=600, env=env)
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # federator run and every process it started
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"federator run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    doc = json.loads((out / "metrics.json").read_text())
    return {"wall": wall, "cpu": cpu, "startup": doc["startup_seconds"], "accuracy": doc["rounds"][-1]["accuracy"],
            "rounds": len(doc["rounds"])}


def phases(manifest: Path) -> tuple[float, float, float]:
    out = subprocess.run([sys.executable, "-c", PHASES, str(manifest)], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=300)
    imports, data, step = (float(x) for x in out.stdout.split())
    return imports, data, step


def heaviest_imports(module: str, count: int = 6) -> list[tuple[str, float]]:
    """Top-level packages by their own import time (ms, summed over their modules) when importing `module`."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=300)
    totals: dict[str, float] = {}
    for line in out.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue
        top = parts[2].strip().split(".")[0]
        totals[top] = totals.get(top, 0.0) + int(parts[0]) / 1000.0
    return sorted(totals.items(), key=lambda kv: -kv[1])[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--manifest", default=str(ROOT / "examples" / "quickstart.yaml"))
    parser.add_argument("--baseline", default=None, help="another checkout to run alternately, for a ratio")
    parser.add_argument("--baseline-label", default=None, help="how the report names the baseline (e.g. a commit)")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    manifest = Path(args.manifest).resolve()
    baseline = Path(args.baseline).resolve() if args.baseline else None

    load_before = load()
    runs, base_runs = [], []
    with tempfile.TemporaryDirectory(prefix="federator-startup-") as tmp:
        for i in range(args.runs):
            if baseline is not None:
                b = run_once(manifest, Path(tmp) / f"base{i}", baseline)
                base_runs.append(b)
                print(f"baseline run {i + 1}: {b['wall']:.2f} s to results, {b['startup']:.2f} s before round 1, "
                      f"{b['cpu']:.2f} s CPU, "
                      f"accuracy {b['accuracy']:.4f}", flush=True)
            r = run_once(manifest, Path(tmp) / f"run{i}")
            runs.append(r)
            print(f"run {i + 1}: {r['wall']:.2f} s to results, {r['startup']:.2f} s before round 1, "
                  f"{r['cpu']:.2f} s CPU, accuracy {r['accuracy']:.4f}", flush=True)
    load_after = load()
    imports, data, step = phases(manifest)
    heavy = heaviest_imports("federator.runtime.client")
    print(f"one process: imports {imports:.2f} s CPU, data {data:.2f} s, first optimizer step {step:.2f} s")
    print("heaviest imports of a worker (ms):", ", ".join(f"{k} {v:.0f}" for k, v in heavy))
    print(f"load before {load_before}, after {load_after}")
    if args.no_doc:
        return

    wall = statistics.median(r["wall"] for r in runs)
    startup = statistics.median(r["startup"] for r in runs)
    cpu = statistics.median(r["cpu"] for r in runs)
    comparison = []
    if base_runs:
        b_wall = statistics.median(b["wall"] for b in base_runs)
        b_startup = statistics.median(b["startup"] for b in base_runs)
        b_cpu = statistics.median(b["cpu"] for b in base_runs)
        comparison = [
            f"Side by side with the baseline checkout `{args.baseline_label or args.baseline}` (runs alternating, "
            "same load), medians. On a shared machine the CPU seconds are the steadier measure: wall time is "
            "what is left of two cores after the other users.",
            "",
            "| | launch to results (s) | before round 1 (s) | CPU of all its processes (s) | final accuracy |",
            "|---|---|---|---|---|",
            f"| baseline | {b_wall:.2f} | {b_startup:.2f} | {b_cpu:.2f} | {base_runs[-1]['accuracy']:.4f} |",
            f"| this tree | {wall:.2f} | {startup:.2f} | {cpu:.2f} | {runs[-1]['accuracy']:.4f} |",
            f"| ratio | {wall / b_wall:.2f}x | {startup / b_startup:.2f}x | {cpu / b_cpu:.2f}x | |",
            "",
        ]
    lines = [
        BEGIN,
        f"## Start-up: `federator run {manifest.relative_to(ROOT) if manifest.is_relative_to(ROOT) else manifest}`"
        " from launch to results (`startup.py`)",
        "",
        f"Measured {dt.date.today().isoformat()} on {cpu_model()} ({os.cpu_count()} cores), Python "
        f"{platform.python_version()}; load average {load_before} before, {load_after} after. The machine is "
        "shared: the numbers move with its load.",
        "",
        "| run | launch to results (s) | before round 1 (s) | CPU of all its processes (s) | final accuracy |",
        "|---|---|---|---|---|",
        *[f"| {i + 1} | {r['wall']:.2f} | {r['startup']:.2f} | {r['cpu']:.2f} | {r['accuracy']:.4f} |"
          for i, r in enumerate(runs)],
        "",
        f"Median: **{wall:.2f} s** to results ({startup:.2f} s before round 1); goal: under {GOAL_SECONDS:.0f} s, "
        f"{'met' if wall < GOAL_SECONDS else 'not met'} at this load.",
        "",
        *comparison,
        "What one process pays before it can work (CPU seconds, measured alone): "
        f"imports of the server and client modules {imports:.2f} s, loading and splitting the data {data:.2f} s, "
        f"torch's first optimizer step {step:.2f} s (it imports `torch._dynamo`; a worker pays it while it "
        "warms up, before it joins). Heaviest imports of a worker, ms of import time per package: "
        + ", ".join(f"`{k}` {v:.0f}" for k, v in heavy) + ".",
        "",
        "How start-up is kept short: the workers start together with the server, on ports reserved for it, and "
        "load their data while it loads its own; nothing at run time imports scikit-learn (the digits are read "
        "from its package data file with numpy, split exactly as `train_test_split` would), kopf or kubernetes; "
        "`federator run` imports matplotlib while the rounds run, not after them; the server and the workers "
        "leave without Python's interpreter teardown once their results are on disk (with torch loaded that "
        "teardown took 2.8 s per process at load 8, against 0.07 s). The largest remaining cost is torch's own "
        "import (about 1.4 s CPU per process, three processes) and `torch._dynamo`, which torch.optim imports on "
        "a worker's first optimizer step (about 1 s CPU per worker).",
        END,
        "",
    ]
    write_section("\n".join(lines), BEGIN, END)


if __name__ == "__main__":
    main()
