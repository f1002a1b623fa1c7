"""Server cost per task at 10, 100 and 1,000 clients per round, and 500 connected workers on one server.

The server runs as its own process (`federator server`, the server pod's command); a load generator in
this process (grpc.aio, one channel per simulated worker, bounded in count and time) speaks the real
protocol: join, heartbeat, long-poll GetTask, stream the update back. Its "training" is free: it sends
the global model it received as its update, so what is measured is the server's own work (dispatch,
receive, checks, aggregation, evaluation, checkpoint), read from /proc as the server process's CPU time.

    python benchmarks/scale.py                          # both parts, writes docs/benchmarks.md's section
    python benchmarks/scale.py --clients 10 100 --workers 200 --no-doc
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.docsection import cpu_model, write_section  # noqa: E402
from federator.runtime.proto import federator_pb2 as pb  # noqa: E402
from federator.runtime.proto import federator_pb2_grpc as pb_grpc  # noqa: E402

SECTION_BEGIN = "<!-- BEGIN scale (written by benchmarks/scale.py; edits here are lost) -->"
SECTION_END = "<!-- END scale -->"
TASK_GOAL_MS = 2.0
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def quickstart(clients: int, rounds: int) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["name"] = f"scale-{clients}"
    doc["spec"]["rounds"] = rounds
    doc["spec"]["clients"].update({"count": clients, "perRound": clients, "minPerRound": clients,
                                   "roundTimeoutSeconds": 300, "maxRoundRetries": 0})
    return doc


# ------------------------------------------------------------------------------------ the server


@dataclass
class ServerProc:
    proc: subprocess.Popen[bytes]
    port: int
    http_port: int
    state: Path

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime

    def rss_mib(self) -> float:
        pages = int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1])
        return pages * PAGE / 2**20

    def threads(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        return 0

    def status(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/status", timeout=5) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result


@contextlib.contextmanager
def server(doc: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> Any:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "fed.yaml").write_text(yaml.safe_dump(doc))
    (workdir / "tokens").write_text("bench\n")
    ready = workdir / "ready"
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "federator", "server", "--config", str(workdir / "fed.yaml"), "--port", "0",
         "--metrics-port", "0", "--state-dir", str(workdir / "state"), "--token-file", str(workdir / "tokens"),
         "--ready-file", str(ready), "--linger-seconds", "2"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    try:
        deadline = time.monotonic() + 120
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {(workdir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.05)
        port, http = (int(v) for v in ready.read_text().split())
        yield ServerProc(proc, port, http, workdir / "state")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


# ------------------------------------------------------------------------------- load generator


@dataclass
class LoadStats:
    joined: int = 0
    tasks: int = 0
    accepted: int = 0
    rejoins: int = 0
    heartbeat_ms: list[float] = field(default_factory=list)
    heartbeat_failures: int = 0
    loop_lag_ms: list[float] = field(default_factory=list)  # the load generator's own delay
    all_joined_at: float | None = None


async def fake_worker(address: str, i: int, stats: LoadStats, stop: asyncio.Event, deadline: float,
                      joined_all: asyncio.Event, total: int, hold: float) -> None:
    """One simulated worker: the real protocol, with the received global model sent back as its update."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FederatorStub(channel)
        cached: tuple[int, list[pb.TensorSpec], int, list[pb.Chunk]] | None = None
        while not stop.is_set() and time.monotonic() < deadline:
            reply = await stub.Join(pb.JoinRequest(token="bench", worker_name=f"load-{i}"), timeout=60)
            wid = reply.worker_id
            stats.joined += 1
            if stats.joined == total:
                stats.all_joined_at = time.monotonic()
                joined_all.set()
            beat = asyncio.create_task(heartbeats(stub, wid, reply.heartbeat_seconds or 1, stats, stop))
            try:
                while not stop.is_set() and time.monotonic() < deadline:
                    have = cached[0] if cached else 0
                    call = stub.GetTask(pb.TaskRequest(token="bench", worker_id=wid, have_version=have,
                                                       wait_seconds=5.0), timeout=60)
                    header: pb.TaskHeader | None = None
                    chunks: list[pb.Chunk] = []
                    async for msg in call:
                        if msg.WhichOneof("body") == "header":
                            header = msg.header
                        else:
                            chunks.append(msg.chunk)
                    if header is None or header.kind == pb.TaskHeader.STOP:
                        stop.set()
                        return
                    if header.kind != pb.TaskHeader.TRAIN:
                        continue
                    if header.weights_included:
                        cached = (header.version, list(header.tensors), header.total_bytes, chunks)
                    if cached is None or cached[0] != header.version:
                        cached = None
                        continue
                    stats.tasks += 1
                    if hold:
                        await asyncio.sleep(hold)
                    ok = await submit(stub, wid, header, cached)
                    stats.accepted += ok
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                stats.rejoins += 1  # the server dropped us (missed heartbeats): join again
            finally:
                beat.cancel()


async def submit(stub: Any, wid: str, task: pb.TaskHeader,
                 cached: tuple[int, list[pb.TensorSpec], int, list[pb.Chunk]]) -> bool:
    async def messages() -> Any:
        yield pb.UpdateMessage(header=pb.UpdateHeader(
            token="bench", worker_id=wid, task_id=task.task_id, round=task.round, client_id=task.client_id,
            base_version=task.version, num_samples=1, train_loss=0.0, train_seconds=0.0,
            tensors=cached[1], total_bytes=cached[2]))
        for c in cached[3]:
            yield pb.UpdateMessage(chunk=c)

    reply = await stub.SubmitUpdate(messages(), timeout=120)
    return bool(reply.accepted)


async def heartbeats(stub: Any, wid: str, every: float, stats: LoadStats, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(every)
        t0 = time.perf_counter()
        try:
            await stub.Heartbeat(pb.HeartbeatRequest(token="bench", worker_id=wid), timeout=30)
            stats.heartbeat_ms.append((time.perf_counter() - t0) * 1000)
        except grpc.aio.AioRpcError:
            stats.heartbeat_failures += 1


async def load(address: str, workers: int, seconds: float, hold: float = 0.0,
               on_all_joined: Any = None, on_deadline: Any = None) -> LoadStats:
    stats = LoadStats()
    stop, joined_all = asyncio.Event(), asyncio.Event()
    deadline = time.monotonic() + seconds
    tasks = [asyncio.create_task(fake_worker(address, i, stats, stop, deadline, joined_all, workers, hold))
             for i in range(workers)]
    async def lag() -> None:  # how late this process's event loop wakes: its share of heartbeat latency
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.1)
            stats.loop_lag_ms.append((time.perf_counter() - t0 - 0.1) * 1000)
    tasks.append(asyncio.create_task(lag()))
    if on_deadline is not None:  # the server's view while every worker still runs (afterwards it reaps them)
        async def at_deadline() -> None:
            await asyncio.sleep(max(0.0, deadline - time.monotonic() - 0.5))
            on_deadline()
        tasks.append(asyncio.create_task(at_deadline()))
    if on_all_joined is not None:
        async def watch() -> None:
            await joined_all.wait()
            await asyncio.sleep(1.0)
            on_all_joined()
        tasks.append(asyncio.create_task(watch()))
    done, pending = await asyncio.wait(tasks, timeout=seconds + 30)
    stop.set()
    for t in pending:
        t.cancel()
    for t in done:
        if t.exception() is not None and not isinstance(t.exception(), asyncio.CancelledError):
            raise t.exception()  # type: ignore[misc]
    return stats


# ---------------------------------------------------------------------------------- experiments


def per_task(clients: int, rounds: int, workers: int, workdir: Path) -> dict[str, Any]:
    with server(quickstart(clients, rounds), workdir / f"clients-{clients}") as s:
        cpu0 = s.cpu_seconds()
        t0 = time.monotonic()
        stats = asyncio.run(load(f"127.0.0.1:{s.port}", workers, seconds=600))
        wall = time.monotonic() - t0
        _, status, usage = os.wait4(s.proc.pid, 0)  # the server exits after its last round: its final rusage
        s.proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        doc = json.loads((s.state / "metrics.json").read_text())
    rounds_done = doc["rounds"]
    tasks = sum(r["participants"] for r in rounds_done)
    return {"clients": clients, "rounds": len(rounds_done), "tasks": tasks, "server_cpu_s": cpu - cpu0,
            "cpu_ms_per_task": 1000 * (cpu - cpu0) / max(tasks, 1),
            "round_s": statistics.median(r["round_seconds"] for r in rounds_done), "wall_s": wall,
            "load_workers": workers, "accepted": stats.accepted}


def many_workers(workers: int, seconds: float, workdir: Path, env: dict[str, str] | None = None,
                 label: str = "") -> dict[str, Any]:
    clients = max(1000, workers)
    doc = quickstart(clients, rounds=1000)  # rounds keep coming until the time bound ends the load
    with server(doc, workdir / f"workers-{workers}{label}", env=env) as s:
        rss0, threads0 = s.rss_mib(), s.threads()
        samples: dict[str, float] = {}
        peak = {"threads": threads0, "rss": rss0}
        done = threading.Event()

        def sample_threads() -> None:
            while not done.wait(0.5):
                with contextlib.suppress(OSError):
                    peak["threads"] = max(peak["threads"], s.threads())
                    peak["rss"] = max(peak["rss"], s.rss_mib())

        seen: dict[str, Any] = {}

        def on_all_joined() -> None:
            samples["rss_joined"] = s.rss_mib()

        def on_deadline() -> None:
            seen["status"] = s.status()
            seen["log"] = (s.state.parent / "server.log").read_text()

        sampler = threading.Thread(target=sample_threads, daemon=True)
        sampler.start()
        stats = asyncio.run(load(f"127.0.0.1:{s.port}", workers, seconds, hold=0.5, on_all_joined=on_all_joined,
                                 on_deadline=on_deadline))
        done.set()
        st, log = seen["status"], seen["log"]
    hb = sorted(stats.heartbeat_ms)
    lag = sorted(stats.loop_lag_ms)
    return {
        "workers": workers, "label": label or "default", "joined": stats.joined, "rejoins": stats.rejoins,
        "tasks": stats.tasks, "accepted": stats.accepted, "rounds": st["round"],
        "connected_at_deadline": st["clients"]["connected"],
        "heartbeats": len(hb), "heartbeat_failures": stats.heartbeat_failures,
        "heartbeat_p50_ms": hb[len(hb) // 2] if hb else None,
        "heartbeat_p99_ms": hb[int(len(hb) * 0.99)] if hb else None,
        "heartbeat_max_ms": hb[-1] if hb else None,
        "dropped_by_server": log.count("stopped responding"),
        "threads_idle": threads0, "threads_peak": peak["threads"],
        "rss_idle_mib": rss0, "rss_joined_mib": samples.get("rss_joined"), "rss_peak_mib": peak["rss"],
        "kib_per_worker": 1024 * (peak["rss"] - rss0) / workers,
        "kib_per_worker_joined": (1024 * (samples["rss_joined"] - rss0) / workers) if "rss_joined" in samples
        else None,
        "load_loop_lag_p99_ms": lag[int(len(lag) * 0.99)] if lag else None,
    }


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def median_row(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median CPU per task, with the spread of all runs (a shared machine is noisy)."""
    ordered = sorted(tries, key=lambda r: r["cpu_ms_per_task"])
    row = dict(ordered[len(ordered) // 2])
    row["cpu_ms_per_task_range"] = (ordered[0]["cpu_ms_per_task"], ordered[-1]["cpu_ms_per_task"])
    row["repeats"] = len(tries)
    return row


def fit(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Least squares: server CPU per round = fixed + per_task * clients. Returns (fixed ms, per-task ms)."""
    xs = [r["clients"] for r in rows]
    ys = [1000 * r["server_cpu_s"] / r["rounds"] for r in rows]
    if len(rows) < 2:
        return 0.0, ys[0] / xs[0]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def render(per: list[dict[str, Any]], many: list[dict[str, Any]], env: dict[str, Any]) -> str:
    fixed, slope = fit(per) if per else (0.0, 0.0)
    lines = [SECTION_BEGIN, "## Scale: 1,000 clients per round and 500 connected workers", "",
             f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores, shared), load average before: "
             f"{env['load_before']}, after: {env['load_after']}. `benchmarks/scale.py`: the server is the "
             "`federator server` process; a load generator (one process, grpc.aio, one channel per worker) "
             "speaks the real protocol and sends the global model back as its update, so the numbers are the "
             "server's own work on the quickstart model (MLP, 4,810 parameters, 19 KiB): dispatch, receive, "
             "checks, FedAvg, evaluation and checkpoint, as the server process's CPU time.", ""]
    if per:
        largest = max(per, key=lambda r: r["clients"])  # where the once-per-run costs are spread thinnest
        ok = slope <= TASK_GOAL_MS and largest["cpu_ms_per_task"] <= TASK_GOAL_MS
        lines += ["| clients per round | rounds | tasks | server CPU per task (median run) | range over runs | "
                  "server CPU per round | round wall time (median) |",
                  "| ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        for r in per:
            lo, hi = r["cpu_ms_per_task_range"]
            lines.append(f"| {r['clients']:,} | {r['rounds']} | {r['tasks']:,} | {r['cpu_ms_per_task']:.2f} ms | "
                         f"{lo:.2f}-{hi:.2f} ms ({r['repeats']} runs) | "
                         f"{1000 * r['server_cpu_s'] / r['rounds']:.0f} ms | {r['round_s'] * 1000:.0f} ms |")
        lines += ["", "CPU per round holds, spread over the rounds, what the server does once after it listens "
                  "(the first evaluation's torch warm-up, the final model file): at 10 clients that is most of it. "
                  "The slope is the cost of one more client per round.", "",
                  f"Fit: server CPU per round = {fixed:.1f} ms + {slope:.3f} ms x clients "
                  f"(goal: linear, <= {TASK_GOAL_MS:g} ms per task, judged on the slope and on the "
                  f"{largest['clients']:,}-client runs' median: **{'met' if ok else 'not met'}**). "
                  f"Load generator: {per[0]['load_workers']} concurrent workers.", ""]
    if many:
        lines += ["| server | workers | joined | tasks done | rounds | heartbeat p50 / p99 / max | "
                  "dropped by the server | connected at the end | threads idle / peak | RSS idle / all joined / peak | "
                  "per worker joined / peak | load generator lag p99 |",
                  "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | --- | ---: |"]
        for m in many:
            lag_ms = f"{m['load_loop_lag_p99_ms']:.0f} ms" if m["load_loop_lag_p99_ms"] is not None else "-"
            joined = f"{m['rss_joined_mib']:.0f}" if m["rss_joined_mib"] is not None else "-"
            kib_joined = f"{m['kib_per_worker_joined']:.0f}" if m["kib_per_worker_joined"] is not None else "-"
            lines.append(
                f"| {m['label']} | {m['workers']} | {m['joined']} | {m['accepted']:,} | {m['rounds']} | "
                f"{m['heartbeat_p50_ms']:.0f} / {m['heartbeat_p99_ms']:.0f} / {m['heartbeat_max_ms']:.0f} ms | "
                f"{m['dropped_by_server']} | {m['connected_at_deadline']} | "
                f"{m['threads_idle']} / {m['threads_peak']} | "
                f"{m['rss_idle_mib']:.0f} / {joined} / {m['rss_peak_mib']:.0f} MiB | "
                f"{kib_joined} / {m['kib_per_worker']:.0f} KiB | {lag_ms} |")
        lines += ["", "Each worker heartbeats every second and long-polls GetTask (5 s); the server drops a "
                  "worker after 5 s without a sign of life. Joined counts rejoins after a drop. Its \"training\" "
                  "holds a task for 0.5 s. Counts are taken just before the load ends. Per worker: the server's RSS "
                  "over its idle RSS, divided by the workers, one second after all joined (a thread, its stack pages, "
                  "the connection) and at its peak (with every worker's update in flight). The load generator's "
                  "lag is how late its own event loop wakes, a part of every latency it measures.", ""]
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--load-workers", type=int, default=10, help="concurrent workers for the per-task part")
    ap.add_argument("--repeats", type=int, default=3, help="runs per client count (the median run is reported)")
    ap.add_argument("--workers", type=int, nargs="*", default=[500], help="connected workers for the second part")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the many-worker load runs")
    ap.add_argument("--compare-threads", type=int, default=None,
                    help="also run the many-worker part with FEDERATOR_GRPC_THREADS set to this")
    ap.add_argument("--no-doc", action="store_true", help="print, do not write docs/benchmarks.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = ap.parse_args(argv)
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
           "cores": os.cpu_count(), "load_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="federator-scale-") as tmp:
        per = []
        for n in args.clients:
            tries = []
            for k in range(args.repeats):
                row = per_task(n, args.rounds, min(args.load_workers, n), Path(tmp) / f"try-{k}")
                print(json.dumps(row), flush=True)
                tries.append(row)
            per.append(median_row(tries))
        many = []
        for w in args.workers:
            if args.compare_threads is not None:
                m = many_workers(w, args.seconds, Path(tmp), env={"FEDERATOR_GRPC_THREADS": str(args.compare_threads)},
                                 label=f"{args.compare_threads} threads")
                print(json.dumps(m), flush=True)
                many.append(m)
            m = many_workers(w, args.seconds, Path(tmp))
            print(json.dumps(m), flush=True)
            many.append(m)
    env["load_after"] = load_average()
    if args.json:
        args.json.write_text(json.dumps({"env": env, "per_task": per, "many_workers": many}, indent=2))
    section = render(per, many, env)
    if args.no_doc:
        print(section)
    else:
        write_section(section, SECTION_BEGIN, SECTION_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
