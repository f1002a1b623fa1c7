"""Throughput of the robust aggregation rules against byzfl's implementations and the memory floor.

For n in {10, 50, 100} clients and d in {1e5, 1e6} parameters, one stacked float32 update matrix (n, d)
from a seed; every rule of ``federator.runtime.robust`` runs on it in this process, and byzfl's
implementation of the same rule runs on the same matrix (rebuilt from the same seed) in a worker
process of byzfl's own virtualenv, through its numpy path and its torch path; the faster counts. The
memory floor is one ``torch.sum`` over the matrix. Both processes use the same number of torch threads
(and OpenBLAS threads). The driver and the worker take turns call by call, so they never compete for the
cores and both see the same background load; before each timed call the caller sleeps ``PAUSE_S`` so that
the other side's OpenMP threads have stopped spinning. Times are the fastest of ``--repeats`` calls
(fewer when one takes over 2 s).

``import byzfl`` imports torchvision (only byzfl's own training benchmark uses it) and no torchvision
build matches torch 2.13 here, so the worker runs with an inert stand-in ``torchvision`` module on its
path; no byzfl code that the rules use touches it.

Run from the repository root: ``benchmarks/run.sh robust`` (creates the byzfl virtualenv), or
``.venv/bin/python benchmarks/robust_throughput.py --byzfl-python VENV/bin/python`` (``--sizes``,
``--repeats``, ``--threads``, ``--no-doc``, ``--render-only``). It writes its section of
``docs/benchmarks.md`` and ``docs/bench-robust-throughput.png``; raw numbers go to
``results/robust-throughput/results.json``. A benchmark, not a test.

This file is also the worker (``--worker``): that part imports only torch, numpy and byzfl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "robust-throughput" / "results.json"
PLOT = ROOT / "docs" / "bench-robust-throughput.png"
SECTION_BEGIN = "<!-- BEGIN robust-throughput (written by benchmarks/robust_throughput.py; edits here are lost) -->"
SECTION_END = "<!-- END robust-throughput -->"
SIZES = [(10, 100_000), (50, 100_000), (100, 100_000), (10, 1_000_000), (50, 1_000_000), (100, 1_000_000)]
GOAL = 5.0
# The issue's baseline at n=100, d=1e6 (2 cores): byzfl's best per rule, in ms.
ISSUE_BASELINE_MS = {"median": 1077, "trimmed_mean": 209, "krum": 734, "multi_krum": 953, "geometric_median": 508}
FRACTION = 0.2  # Byzantine fraction the parameters are set for: f = round(0.2 n), trim 0.2
TAU = 10.0  # centered clipping radius (norms are about sqrt(d): every row is clipped)
CLIP = 10.0  # norm clipping bound
GM_ITERATIONS = 3  # byzfl's GeometricMedian default T; ours runs the same number (tol = 0)
GM_EPS = 0.1  # byzfl's default nu
BUCKET = 2
SORT_TILE = 4096  # columns per transposed tile, as federator.runtime.order_stats sorts them
SLOW_S = 2.0
PAUSE_S = 0.02  # libgomp threads spin for a while after each parallel region
# What a call's time is: this process's CPU time with one thread (steady on a shared machine: it does not
# count the time other processes hold the cores), the wall clock with more (CPU time would add threads up).
CLOCK: list[Callable[[], float]] = [time.perf_counter]
STANDIN = '''"""Inert stand-in for torchvision, written by benchmarks/robust_throughput.py.

byzfl imports torchvision for its training benchmark only; no torchvision matches torch 2.13 here.
Every attribute is an inert object that can be called or looked into.
"""


class _Inert:
    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name):
        return _Inert()


def __getattr__(name):
    return _Inert()
'''


def make_stack(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def fastest(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Seconds of the fastest call (one call when the first is slow) and the last result."""
    best = float("inf")
    out: Any = None
    for i in range(repeats):
        time.sleep(PAUSE_S)
        start = CLOCK[0]()
        out = fn()
        best = min(best, CLOCK[0]() - start)
        if i == 0 and best > SLOW_S:
            break
    return best, out


def fingerprint(v: Any) -> list[float]:
    """Sum and squared norm in float64: enough to tell whether two implementations agree."""
    a = v.detach().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)
    return [float(a.sum()), float((a * a).sum())]


def params(n: int) -> dict[str, Any]:
    return {"f": max(1, round(FRACTION * n))}


# --- the byzfl worker (byzfl's virtualenv) -------------------------------------------------------------------


def reference_point(x: torch.Tensor) -> torch.Tensor:
    """Centered clipping's reference in a later round: the previous aggregate, here the rows' mean."""
    return x.mean(dim=0)


def byzfl_jobs(n: int, reference: torch.Tensor) -> dict[str, Callable[[Any], Callable[[Any], Any]]]:
    """Rule name -> a factory of byzfl's callable with the same parameters as ours, given the input
    (its numpy or its torch form)."""
    import byzfl

    f = params(n)["f"]

    def from_reference(data: Any) -> Any:
        # byzfl 0.0.11's constructor rejects every m (its type check can never pass), so set the attribute
        # its __call__ starts from, as a CenteredClipping object holds it after a first round
        agg = byzfl.CenteredClipping(tau=TAU, L=1)
        agg.m = reference.numpy().copy() if isinstance(data, np.ndarray) else reference.clone()
        return agg

    return {
        "fedavg": lambda _: byzfl.Average(),
        "median": lambda _: byzfl.Median(),
        "trimmed_mean": lambda _: byzfl.TrMean(f=f),
        "krum": lambda _: byzfl.Krum(f=f),
        "multi_krum": lambda _: byzfl.MultiKrum(f=f),
        "geometric_median": lambda _: byzfl.GeometricMedian(nu=GM_EPS, T=GM_ITERATIONS),
        "centered_clipping": lambda _: byzfl.CenteredClipping(tau=TAU, L=1),
        "centered_clipping_ref": from_reference,
        "norm_clip": lambda _: byzfl.Clipping(c=CLIP),
        "bucketing": lambda _: byzfl.Bucketing(s=BUCKET),
        "nnm": lambda _: byzfl.NNM(f=f),
    }


def worker(threads: int) -> int:
    """Answer one JSON line per request: ``setup`` builds the matrix, ``run`` times one call of a rule."""
    torch.set_num_threads(threads)
    x = torch.empty(0)
    xn = x.numpy()
    jobs: dict[str, Callable[[Any], Callable[[Any], Any]]] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "setup":
            x = make_stack(req["n"], req["d"], req["seed"])
            xn = x.numpy()
            jobs = byzfl_jobs(req["n"], reference_point(x))
            floor, _ = fastest(lambda x=x: torch.sum(x), req["repeats"])
            answer: dict[str, Any] = {"floor_s": floor, "input": fingerprint(x)}
        else:
            data: Any = xn if req["path"] == "numpy" else x
            if req["rule"] == "norm_clip":  # byzfl's Clipping writes into the caller's array: give it a copy
                data = data.copy() if isinstance(data, np.ndarray) else data.clone()
            agg = jobs[req["rule"]](data)  # a fresh object per call: no state kept between calls
            time.sleep(PAUSE_S)
            start = CLOCK[0]()
            out = agg(data)
            answer = {"s": CLOCK[0]() - start, "fingerprint": fingerprint(out)}
            del out, data
        print(json.dumps(answer), flush=True)
    return 0


# --- the driver (the project's virtualenv) -------------------------------------------------------------------


def sort_floor(x: torch.Tensor) -> torch.Tensor:
    """numpy's sort of every coordinate's n values, already contiguous and in cache: the floor of any
    median or trimmed mean that sorts (one transposed tile, copied and sorted once per tile of x)."""
    d = x.shape[1]
    tile = np.ascontiguousarray(x[:, :SORT_TILE].numpy().T)
    work = np.empty_like(tile)
    for start in range(0, d, SORT_TILE):
        c = min(SORT_TILE, d - start)
        np.copyto(work[:c], tile[:c])
        work[:c].sort(axis=1)
    return torch.from_numpy(work[:, 0])


def our_jobs(n: int, d: int, reference: torch.Tensor) -> dict[str, Callable[[torch.Tensor], Any]]:
    from federator.runtime import robust

    f = params(n)["f"]
    zeros = torch.zeros(d)
    return {
        "fedavg": lambda x: robust.fedavg(x),
        "median": robust.coordinate_median,
        "trimmed_mean": lambda x: robust.trimmed_mean(x, f / n),
        "krum": lambda x: robust.krum(x, f),
        "multi_krum": lambda x: robust.multi_krum(x, f, n - f),
        "geometric_median": lambda x: robust.geometric_median(x, eps=GM_EPS, tol=0.0, max_iter=GM_ITERATIONS),
        "geometric_median_tol": lambda x: robust.geometric_median(x),
        "centered_clipping": lambda x: robust.centered_clipping(x, zeros, TAU, 1),
        "centered_clipping_ref": lambda x: robust.centered_clipping(x, reference, TAU, 1),
        "norm_clip": lambda x: robust.norm_clip(x, CLIP),
        "bucketing": lambda x: robust.bucketing(x, BUCKET, torch.Generator().manual_seed(0)),
        "nnm": lambda x: robust.nnm(x, f),
        "sort_floor": sort_floor,
    }


def write_standin(folder: Path) -> Path:
    pkg = folder / "torchvision"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(STANDIN)
    return folder


def load() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import subprocess

    torch.set_num_threads(args.threads)
    standin = write_standin(RESULTS.parent / "standin")
    env = dict(os.environ, PYTHONPATH=str(standin), OPENBLAS_NUM_THREADS=str(args.threads))
    child = subprocess.Popen(
        [args.byzfl_python, str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT / "benchmarks"),
    )
    versions = subprocess.run(
        [args.byzfl_python, "-c", "import importlib.metadata as m, numpy, torch; "
         "print(m.version('byzfl'), numpy.__version__, torch.__version__)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.split()
    runs = []
    load_before = load()
    started = time.time()

    def ask(req: dict[str, Any]) -> dict[str, Any]:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(req) + "\n")
        child.stdin.flush()
        answer: dict[str, Any] = json.loads(child.stdout.readline())
        return answer

    try:
        for n, d in args.sizes:
            seed = n * 7 + d
            x = make_stack(n, d, seed)
            floor, _ = fastest(lambda x=x: torch.sum(x), args.repeats)
            setup = ask({"op": "setup", "n": n, "d": d, "seed": seed, "repeats": args.repeats})
            if setup["input"] != fingerprint(x):
                raise RuntimeError(f"n={n}, d={d}: the byzfl worker built different data ({setup['input']})")
            ours: dict[str, dict[str, Any]] = {}
            theirs: dict[str, dict[str, dict[str, Any]]] = {}
            # Rule by rule, call by call, the two sides take turns: both see the same load.
            for rule, fn in our_jobs(n, d, reference_point(x)).items():
                paths = ("numpy", "torch") if rule in BYZFL_RULES or (rule == "nnm" and nnm_fits(n, d)) else ()
                for _ in range(args.repeats):
                    if ours.get(rule, {}).get("s", 0.0) <= SLOW_S:
                        time.sleep(PAUSE_S)
                        start = CLOCK[0]()
                        out = fn(x)
                        seconds = CLOCK[0]() - start
                        if seconds < ours.get(rule, {}).get("s", float("inf")):
                            ours[rule] = {"s": seconds, "fingerprint": fingerprint(out)}
                        del out
                    for path in paths:
                        best = theirs.setdefault(rule, {}).get(path)
                        if best is None or best["s"] <= SLOW_S:
                            answer = ask({"op": "run", "rule": rule, "path": path})
                            if best is None or answer["s"] < best["s"]:
                                theirs[rule][path] = answer
            del x
            runs.append({"n": n, "d": d, "f": params(n)["f"], "floor_s": floor, "byzfl_floor_s": setup["floor_s"],
                         "ours": ours, "byzfl": theirs})
            print(summary_lines(runs[-1]), flush=True)
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(60)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "minutes": (time.time() - started) / 60,
        "threads": args.threads, "clock": "cpu" if args.threads == 1 else "wall",
        "repeats": args.repeats, "load_before": load_before, "load_after": load(),
        "torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
        "byzfl": versions[0], "byzfl_numpy": versions[1], "byzfl_torch": versions[2],
        "runs": runs,
    }


BYZFL_RULES = ["fedavg", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "centered_clipping",
               "centered_clipping_ref", "norm_clip", "bucketing"]
SAME_DEFINITION = {"fedavg", "median", "trimmed_mean", "centered_clipping", "centered_clipping_ref", "norm_clip", "nnm"}
GOAL_RULES = ["median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "centered_clipping",
              "centered_clipping_ref"]
NOTES = {
    "centered_clipping": "reference 0 (a first round)",
    "centered_clipping_ref": "reference = the rows' mean (a later round: the previous aggregate); byzfl's "
    "constructor rejects every m, so its attribute is set",
    "krum": "byzfl scores with n-f-1 neighbours, Blanchard et al. with n-f-2",
    "multi_krum": "m = n - f (byzfl's choice)",
    "geometric_median": f"{GM_ITERATIONS} Weiszfeld iterations on both sides (byzfl's default T); "
    "byzfl starts at 0, ours at the mean",
    "bucketing": "random permutations differ",
}


# byzfl's NNM gathers every row's n - f neighbours into one (n, n - f, d) array (32 GB at n = 100, d = 1e6):
# it runs only where that fits under this bound, and the table says so elsewhere.
NNM_GATHER_LIMIT = 4 << 30


def nnm_fits(n: int, d: int) -> bool:
    return n * (n - params(n)["f"]) * d * 4 <= NNM_GATHER_LIMIT


def nnm_row(run: dict[str, Any]) -> list[str]:
    """The NNM pre-step's row (byzfl.NNM where its gather fits); none for results from before it existed."""
    if "nnm" not in run["ours"]:
        return []
    ours = run["ours"]["nnm"]["s"]
    head = f"| nnm (pre-step, f = {run['f']}) | {1e3 * ours:.1f} ms | "
    note = "one Gram matrix and one (n, n) @ (n, d) product |"
    if "nnm" not in run["byzfl"]:
        gather = run["n"] * (run["n"] - run["f"]) * run["d"] * 4 / 2**30
        return [head + f"not run: byzfl.NNM would gather {gather:.0f} GiB | | {ours / run['floor_s']:.1f} | | "
                + note]
    tail = f"{ours / run['floor_s']:.1f} | {agrees(run, 'nnm')} | " + note
    theirs, path = best_byzfl(run, "nnm")
    other = "torch" if path == "numpy" else "numpy"
    return [head + f"{1e3 * theirs:.1f} ms ({path}; {other} {1e3 * run['byzfl']['nnm'][other]['s']:.0f} ms) | "
            f"**{theirs / ours:.1f}x** | " + tail]


def best_byzfl(run: dict[str, Any], rule: str) -> tuple[float, str]:
    paths = run["byzfl"][rule]
    path = min(paths, key=lambda p: paths[p]["s"])
    return paths[path]["s"], path


def agrees(run: dict[str, Any], rule: str) -> str:
    if rule not in SAME_DEFINITION:
        return "n/a"
    ours = run["ours"][rule]["fingerprint"]
    theirs = run["byzfl"][rule][best_byzfl(run, rule)[1]]["fingerprint"]
    ok = all(abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in zip(ours, theirs, strict=True))
    return "yes" if ok else "**no**"


def summary_lines(run: dict[str, Any]) -> str:
    lines = [f"n={run['n']} d={run['d']:.0e} floor {1e3 * run['floor_s']:.1f} ms"]
    for rule in BYZFL_RULES:
        ours = run["ours"][rule]["s"]
        theirs, path = best_byzfl(run, rule)
        lines.append(f"  {rule:22s} ours {1e3 * ours:9.1f} ms  byzfl({path}) {1e3 * theirs:9.1f} ms  "
                     f"x{theirs / ours:6.1f}  ours/floor {ours / run['floor_s']:5.1f}")
    return "\n".join(lines)


CLOCK_TEXT = {
    "cpu": "each process's CPU time for the call: with one thread that is what the wall clock shows on an idle "
    "machine, and it leaves out the time other processes hold the cores (the machine is shared)",
    "wall": "wall-clock times",
}


def render(data: dict[str, Any]) -> str:
    from docsection import cpu_model

    big = next((r for r in data["runs"] if (r["n"], r["d"]) == (100, 1_000_000)), data["runs"][-1])
    head = "| rule | ours | byzfl best (path) | byzfl / ours | ours / floor | same result | note |\n"
    head += "|---|---:|---:|---:|---:|---|---|\n"
    tables = []
    for run in data["runs"]:
        rows = [f"| memory floor: `torch.sum` | {1e3 * run['floor_s']:.1f} ms | "
                f"{1e3 * run['byzfl_floor_s']:.1f} ms (in its process) | | 1.0 | | |"]
        for rule in BYZFL_RULES:
            ours = run["ours"][rule]["s"]
            theirs, path = best_byzfl(run, rule)
            other = "torch" if path == "numpy" else "numpy"
            rows.append(
                f"| {rule} | {1e3 * ours:.1f} ms | {1e3 * theirs:.1f} ms ({path}; {other} "
                f"{1e3 * run['byzfl'][rule][other]['s']:.0f} ms) | **{theirs / ours:.1f}x** | "
                f"{ours / run['floor_s']:.1f} | {agrees(run, rule)} | {NOTES.get(rule, '')} |"
            )
        gm = run["ours"]["geometric_median_tol"]["s"]
        rows.append(f"| geometric_median to tol 1e-6 (our default) | {1e3 * gm:.1f} ms | | | "
                    f"{gm / run['floor_s']:.1f} | | up to 100 iterations |")
        rows += nnm_row(run)
        if "sort_floor" in run["ours"]:
            srt = run["ours"]["sort_floor"]["s"]
            rows.append(f"| numpy's sort alone, each coordinate's values contiguous and in cache | {1e3 * srt:.1f} ms "
                        f"| | | {srt / run['floor_s']:.1f} | | the floor of any median or trimmed mean that sorts |")
        tables.append(f"**n = {run['n']}, d = {run['d']:,}** (f = {run['f']})\n\n{head}" + "\n".join(rows))
    verdicts = []
    for rule in GOAL_RULES:
        ours = big["ours"][rule]["s"]
        theirs, _ = best_byzfl(big, rule)
        ratio = theirs / ours
        verdicts.append(f"{rule} {ratio:.1f}x ({'met' if ratio >= GOAL else '**not met**'})")
    missed = [v for v in verdicts if "not met" in v]
    why = why_missed(big)
    baseline = against_issue(big, data)
    from federator.runtime.order_stats import network_ops_per_value

    net10 = f"{network_ops_per_value(10, 2):.1f}"
    net50 = f"{network_ops_per_value(50, 10):.1f}"
    tile = SORT_TILE
    return f"""{SECTION_BEGIN}
## Robust aggregation throughput against byzfl (`robust_throughput.py`)

Measured {data['date']} by `benchmarks/robust_throughput.py` (`benchmarks/run.sh robust`) in
{data['minutes']:.1f} minutes; machine: {os.cpu_count()}
CPUs (`nproc`), {cpu_model()}; load average (1, 5, 15 min) before {data['load_before']}, after
{data['load_after']} (a shared
machine: the ratios, measured side by side, are the result; the milliseconds move with the load).
Federator: Python {data['python']}, torch {data['torch']}, numpy {data['numpy']}. byzfl {data['byzfl']} (torch
{data['byzfl_torch']}, numpy {data['byzfl_numpy']}) in its own virtualenv, run as a worker process with an **inert
stand-in `torchvision`** on its path (`import byzfl` imports torchvision for byzfl's training benchmark; no
torchvision build matches torch 2.13 here; the rules never touch it). {data['threads']} torch thread(s) (and
OpenBLAS threads) on both sides; the two processes take turns, so they never share the cores. Times are
{CLOCK_TEXT[data.get('clock', 'wall')]}. Each time is the
fastest of {data['repeats']} calls (fewer when a call took over {SLOW_S:g} s) on the same float32 (n, d)
matrix, built from the same seed on both sides (checked); the two sides take turns call by call, so both
see the same load. byzfl runs through its numpy path and its torch path;
the faster counts. Parameters: f = round({FRACTION} n), trimmed mean trims f per side, Multi-Krum averages n - f,
centered clipping tau = {TAU:g} with one iteration from a zero reference, norm clipping to {CLIP:g}, buckets of
{BUCKET}. "same result": sum and squared norm of both outputs agree to 1e-3 where both compute the same
definition.

Goal (issue 7): at least {GOAL:g}x faster than byzfl's best for each robust rule, at n = 100, d = 1e6. Result:
{'; '.join(verdicts)}.{' Missed: see below.' if missed else ''}

![robust aggregation throughput](bench-robust-throughput.png)

{chr(10).join(t + chr(10) for t in tables)}
How ours gets there: median and trimmed mean (`order_stats.middle_mean`) run, for small n, a sorting network
(Batcher's odd-even merge sort, pruned to the comparators that separate the trimmed low, kept and trimmed high
values: {net10} min/max passes per value at n = 10, {net50} at n = 50) as whole-row `torch.minimum`/`torch.maximum`
over tiles of coordinates, with no transpose and no call per coordinate; from n = 33 on (trim 0.2) they transpose
tiles of {tile:,} coordinates and sort each coordinate's n values with numpy's vectorised sort (AVX-512 sorting
networks; on rows of ~100 values about 5x faster than torch.sort, torch.kthvalue or torch.topk), reduced by one
matrix-vector product, one thread per torch thread; Krum, Multi-Krum and the geometric median
build one n x n Gram matrix with one BLAS product (translated by the median-norm row and recomputed only when
float32 cancellation would cost over 1% of the distances), after which Weiszfeld iterates on n coefficients
instead of d-vectors; centered clipping takes its distances from |x|^2 - 2x.v + |v|^2 (row norms once, one
matrix-vector product per iteration, cancelling rows measured directly; from a zero reference the row norms are
the distances, so a first round reads the matrix twice and a later one three times); FedAvg and Multi-Krum's mean
are one matrix-vector product. byzfl computes the median with `np.median` (a partition) or `torch.quantile`, builds all
n^2 distances through `cdist`, and allocates a new (n, d) difference matrix per Weiszfeld or clipping iteration.

{baseline}

{why}
{SECTION_END}
"""


MISSED_WHY: dict[str, Callable[[dict[str, Any]], str]] = {
    "trimmed_mean": lambda big: "**Trimmed mean misses the goal.** byzfl's numpy path is itself a vectorised sort "
    "(`np.sort` along the columns runs the same AVX-512 sorting networks) followed by a mean. Ours does the same sort "
    "on a cache-friendly transposed layout, but the sort alone, with each coordinate's values already contiguous and "
    f"in cache, costs {1e3 * big['ours']['sort_floor']['s']:.0f} ms here (the row above: "
    f"{1e9 * big['ours']['sort_floor']['s'] / (big['n'] * big['d']):.2f} ns per value), against a 5x target of "
    f"{1e3 * best_byzfl(big, 'trimmed_mean')[0] / GOAL:.0f} ms; the transpose adds about 0.9 ns per value. Exact "
    "selection instead of a sort is slower with the tools at hand: numpy's partition 2.2 ns per value, torch's topk "
    "and kthvalue 10 to 50; a selection network vectorised over coordinates needs "
    f"{network_ops_per_value_text(big['n'])} min/max passes over the stack at n = {big['n']}. Five times byzfl needs "
    "a per-coordinate quickselect in compiled code (no new compiled dependency without the lead's agreement).",
    "centered_clipping": lambda big: "**Centered clipping from a zero reference misses the goal.** It reads the "
    "matrix twice (row norms, then the update); byzfl's numpy path builds (n, d) differences twice.",
    "centered_clipping_ref": lambda big: "**Centered clipping from a nonzero reference misses the goal.** One "
    "iteration reads the matrix three times (row norms, x.v, the update): fusing the first two over cache-sized "
    "tiles was measured slower with torch's kernels; a further factor needs one compiled pass.",
    "median": lambda big: "**Median misses the goal here.** The sort costs about 1.4 ns per value; byzfl's `np.median` "
    "partitions instead, which is slower per value but reads each column once.",
    "krum": lambda big: "**Krum misses the goal here.** Its time is the one n x n Gram product (BLAS, compute-bound "
    "at n = 100).",
    "multi_krum": lambda big: "**Multi-Krum misses the goal here.** Its time is the Gram product plus one "
    "matrix-vector product.",
    "geometric_median": lambda big: "**The geometric median misses the goal here.** Its time is the Gram product plus "
    "one matrix-vector product; byzfl's three iterations are cheaper than our Gram product at this size.",
}


def network_ops_per_value_text(n: int) -> str:
    from federator.runtime.order_stats import network_ops_per_value

    return f"{network_ops_per_value(n, round(FRACTION * n)):.1f}"


def against_issue(big: dict[str, Any], data: dict[str, Any]) -> str:
    """Our absolute times next to the issue's targets (5x below its byzfl baseline, 2 cores, wall clock)."""
    parts = []
    for rule, base in ISSUE_BASELINE_MS.items():
        theirs = 1e3 * best_byzfl(big, rule)[0]
        parts.append(f"{rule} {1e3 * big['ours'][rule]['s']:.0f} ms (target {base / GOAL:.0f} ms; byzfl here "
                     f"{theirs:,.0f} ms, in the issue {base:,} ms)")
    clock = "CPU time on one thread" if data.get("clock") == "cpu" else f"wall clock on {data['threads']} threads"
    return (f"Against the issue's absolute targets at n = 100, d = 1e6 (its byzfl times / {GOAL:g}, measured on 2 "
            f"cores by wall clock; ours here by {clock}): " + "; ".join(parts) + ".")


def why_missed(big: dict[str, Any]) -> str:
    lines = []
    for rule, text in MISSED_WHY.items():
        ours = big["ours"][rule]["s"]
        if best_byzfl(big, rule)[0] / ours < GOAL:
            lines.append(text(big))
    lines.append(
        "Outside the goal: FedAvg is one pass over the matrix on both sides (both at the memory floor); byzfl's "
        "Clipping rescales the caller's matrix in place (this benchmark hands it a copy made outside the timer), "
        "while ours returns a new matrix as the kernels' contract requires, and allocating and first touching "
        "n x d floats is most of its time; bucketing is one pass plus the new (n/s, d) matrix on both sides. At "
        "n = 10 and 50 the fixed costs (per call, per tile, per coordinate in byzfl's sort) weigh differently and the "
        "ratios differ from n = 100."
    )
    return "\n\n".join(lines)


def plot(data: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = [r for r in BYZFL_RULES]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    big = next((r for r in data["runs"] if (r["n"], r["d"]) == (100, 1_000_000)), data["runs"][-1])
    xs = np.arange(len(rules))
    ours = [1e3 * big["ours"][r]["s"] for r in rules]
    theirs = [1e3 * best_byzfl(big, r)[0] for r in rules]
    axes[0].bar(xs - 0.2, theirs, 0.4, label="byzfl (best of numpy, torch)", color="#c44e52")
    axes[0].bar(xs + 0.2, ours, 0.4, label="Federator", color="#4c72b0")
    axes[0].axhline(1e3 * big["floor_s"], color="k", ls="--", lw=1, label="memory floor (torch.sum)")
    axes[0].set_yscale("log")
    axes[0].set_xticks(xs, rules, rotation=35, ha="right")
    axes[0].set_ylabel("ms per aggregation (log)")
    axes[0].set_title(f"n = {big['n']}, d = {big['d']:,}")
    axes[0].legend(fontsize=8)
    width = 0.8 / len(data["runs"])
    for i, run in enumerate(data["runs"]):
        speed = [best_byzfl(run, r)[0] / run["ours"][r]["s"] for r in rules]
        axes[1].bar(xs - 0.4 + width * (i + 0.5), speed, width, label=f"n={run['n']}, d={run['d']:.0e}")
    axes[1].axhline(GOAL, color="k", ls="--", lw=1, label=f"goal {GOAL:g}x")
    axes[1].set_yscale("log")
    axes[1].set_xticks(xs, rules, rotation=35, ha="right")
    axes[1].set_ylabel("byzfl time / Federator time (log)")
    axes[1].set_title("speed-up over byzfl")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        n, d = item.lower().split("x")
        sizes.append((int(n), int(float(d))))
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--byzfl-python", default=str(ROOT / ".venv-byzfl" / "bin" / "python"))
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenBLAS threads on both sides")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=parse_sizes, default=SIZES, help="NxD,... e.g. 10x1e5,100x1e6")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--render-only", action="store_true", help=f"rewrite the doc and plot from {RESULTS.name}")
    args = parser.parse_args()
    CLOCK[0] = time.process_time if args.threads == 1 else time.perf_counter
    if args.worker:
        return worker(args.threads)
    for p in (ROOT, ROOT / "benchmarks"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    if args.render_only:
        data = json.loads(RESULTS.read_text())
    else:
        data = measure(args)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1))
    section = render(data)
    print(section)
    if not args.no_doc:
        from docsection import write_section

        plot(data)
        write_section(section, SECTION_BEGIN, SECTION_END)
        print(f"wrote docs/benchmarks.md and {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
