"""The real kopf operator reconciling many Federations against kmock's KubernetesEmulator over HTTP.

Reuses the integration tests' machinery (``tests/integration/conftest.py``): ``ApiServer`` (kmock's
emulator plus uid/resourceVersion/generation, server-side apply and subresources), the CRDs declared for
kopf's discovery, and the fake ``/status`` endpoint of every federation's server (a tiny aiohttp app that
answers a fixed "Pending" report; the poll interval is long so polling does not dominate).

Measured, for N Federations (default 100) created one after the other over HTTP:

1. the time from the first create until every Federation's seven children exist in the emulator, and
   until the operator has gone quiet (no write for a second);
2. the API requests the emulator received from the operator, per Federation: reads (GET: get, list,
   watch), writes (POST/PUT/PATCH/DELETE, events apart) and events; the benchmark's own N creates are
   not counted, and the operator's start-up (discovery, initial lists, watches) is reported apart;
3. memory: the peak RSS of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The process
   holds the operator (in its own thread, as in the tests), the emulator and its stored objects, so the
   growth over the baseline taken before the operator starts is an upper bound on the operator's share.

Run from the repository root: ``.venv/bin/python benchmarks/operator_reconcile.py`` (``--count N``,
``--no-doc``). It writes its section of ``docs/benchmarks.md`` between markers. This is a benchmark, not a
test: nothing here asserts on time, and there is no peer to compare with, so the numbers are absolute.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import enum
import importlib.metadata
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import kmock  # noqa: E402
import kopf  # noqa: E402
import kubernetes.config.kube_config  # noqa: E402
import yaml  # noqa: E402
from docsection import DOC, cpu_model, write_section  # noqa: E402

from federator.operator.main import operator_options  # noqa: E402
from federator.operator.reconcile import OperatorConfig  # noqa: E402
from tests.integration.conftest import (  # noqa: E402
    ApiServer,
    crd_resources,
    kubeconfig_for,
    operator_thread,
    serve_fake_status,
    server_report,
)

SECTION_BEGIN = "<!-- BEGIN operator-reconcile (written by benchmarks/operator_reconcile.py; edits here are lost) -->"
SECTION_END = "<!-- END operator-reconcile -->"
NS = "default"
FEDS_URL = f"/apis/federator.dev/v1alpha1/namespaces/{NS}/federations"
CHILDREN = (  # what the operator creates for a Federation `x` (as in tests/integration/test_operator_kmock.py)
    ("v1/configmaps", "{}-config"),
    ("v1/secrets", "{}-credentials"),
    ("v1/services", "{}-server"),
    ("apps/v1/statefulsets", "{}-server"),
    ("apps/v1/deployments", "{}-clients"),
    ("policy/v1/poddisruptionbudgets", "{}-clients"),
    ("networking.k8s.io/v1/networkpolicies", "{}-server"),
)
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def rss_mib() -> float:
    """Peak RSS of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def federation(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "federator.dev/v1alpha1", "kind": "Federation",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"rounds": 5, "clients": {"count": 10, "perRound": 8, "workers": 2}},
    }


@dataclass
class Counts:
    reads: int = 0
    writes: int = 0
    events: int = 0

    @property
    def total(self) -> int:
        return self.reads + self.writes + self.events


def verb(r: kmock.Request) -> str:
    method: Any = r.method
    return str(method.value if isinstance(method, enum.Enum) else method).upper()


def count(requests: list[kmock.Request]) -> Counts:
    result = Counts()
    for r in requests:
        if r.resource is not None and r.resource.plural == "events":
            result.events += 1
        elif verb(r) in WRITE_METHODS:
            result.writes += 1
        else:
            result.reads += 1
    return result


def is_write(r: kmock.Request) -> bool:
    return verb(r) in WRITE_METHODS and not (r.resource is not None and r.resource.plural == "events")


@dataclass
class Result:
    count: int
    create_s: float
    children_s: float
    quiet_s: float
    startup: Counts
    reconcile: Counts
    per_kind: dict[str, int]
    rss_baseline_mib: float
    rss_ready_mib: float
    rss_peak_mib: float
    rss_end_mib: float
    status_hits: int
    operator_cpu_s: float


class RequestLog:
    """Every request the emulator served, kept out of kmock's own history.

    kmock matches each new request against its reactions by scanning the whole request history
    (`request in view`), so its cost per request grows with the requests served so far: quadratic over a
    run of thousands of requests, and it would be timed as if it were the operator's. This moves all but
    the newest requests (which may still be matching) out of kmock's list into ours every 0.1 s.
    """

    KEEP = 16

    def __init__(self, api: ApiServer) -> None:
        self._raw: list[kmock.Request] = api._requests
        self._moved: list[kmock.Request] = []

    def drain(self) -> None:
        if len(self._raw) > 2 * self.KEEP:
            cut = len(self._raw) - self.KEEP
            self._moved.extend(self._raw[:cut])
            del self._raw[:cut]

    def all(self) -> list[kmock.Request]:
        return [*self._moved, *self._raw]

    async def keep_draining(self) -> None:
        while True:
            self.drain()
            await asyncio.sleep(0.1)


def write_kubeconfig(api: ApiServer, directory: Path) -> None:
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig_for(api)))
    os.environ["KUBECONFIG"] = str(path)
    kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)  # read once at import
    os.environ.pop("KUBERNETES_SERVICE_HOST", None)


def cpu_seconds(thread: threading.Thread) -> float:
    """CPU time of one thread: the operator's (the emulator runs in the main thread)."""
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def all_children(api: ApiServer, names: list[str]) -> bool:
    for name in names:
        for resource_, pattern in CHILDREN:
            key: Any = (resource_, NS, pattern.format(name))
            try:
                if api.objects[key].deleted:
                    return False
            except KeyError:
                return False
    return True


async def wait_quiet(log: RequestLog, quiet: float, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = sum(1 for r in log.all() if is_write(r))
    since = loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.05)
        now = sum(1 for r in log.all() if is_write(r))
        if now != seen:
            seen, since = now, loop.time()
        elif loop.time() - since >= quiet:
            return
    print(f"warning: the operator still wrote after {timeout:.0f} s", file=sys.stderr)


async def bench(n: int, status_interval: float) -> Result:
    names = [f"fed-{i:03d}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        async with ApiServer() as api, kmock.Server(api), serve_fake_status() as fakes:
            for name in names:
                fakes.set(name, server_report(name, phase="Pending", round=0, rounds=5))
            crd_resources(api)
            log = RequestLog(api)
            drainer = asyncio.create_task(log.keep_draining())
            write_kubeconfig(api, Path(tmp))
            config = OperatorConfig(status_interval=status_interval, status_timeout=2.0, startup_grace=0.0,
                                    retry_delay=0.3, status_url_template=fakes.url + "/{namespace}/{name}/status")
            rss_baseline = rss_mib()
            options = operator_options(None, None, None)  # all namespaces, standalone
            async with operator_thread(kopf.Memo(config=config), options, 30, 30) as operator:
                await asyncio.sleep(1.0)  # let the initial lists and watches connect
                cpu_ready = cpu_seconds(operator)
                startup_n = len(log.all())
                rss_ready = current_rss_mib()
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                for name in names:
                    resp = await api.post(FEDS_URL, json=federation(name))
                    if resp.status >= 300:
                        raise RuntimeError(f"create {name}: {resp.status} {await resp.text()}")
                create_s = loop.time() - t0
                deadline = t0 + 170
                last_report = loop.time()
                while not all_children(api, names):
                    if loop.time() - last_report > 5:
                        done = sum(all_children(api, [name]) for name in names)
                        print(f"  {loop.time() - t0:5.1f} s: {done}/{n} Federations have all children, "
                              f"{len(log.all())} requests", file=sys.stderr, flush=True)
                        last_report = loop.time()
                    if loop.time() > deadline:
                        raise RuntimeError("not every Federation got its children within 170 s")
                    await asyncio.sleep(0.05)
                children_s = loop.time() - t0
                await wait_quiet(log, quiet=1.0, timeout=60)
                quiet_s = loop.time() - t0 - 1.0  # the last write, not the end of the quiet second
                requests = log.all()
                cpu_reconcile = cpu_seconds(operator) - cpu_ready
                drainer.cancel()
                # the benchmark's own creates: the operator itself never creates a Federation
                reconcile_reqs = [r for r in requests[startup_n:] if not (
                    verb(r) == "POST" and r.resource is not None and r.resource.plural == "federations")]
                per_kind: dict[str, int] = {}
                for r in reconcile_reqs:
                    plural = r.resource.plural if r.resource is not None and r.resource.plural else str(r.url.path)
                    key = f"{verb(r)} {plural}{'/' + r.subresource if r.subresource else ''}"
                    per_kind[key] = per_kind.get(key, 0) + 1
                rss_end = current_rss_mib()
                status_hits = sum(fakes.hits.values())
            return Result(
                count=n, create_s=create_s, children_s=children_s, quiet_s=quiet_s,
                startup=count(requests[:startup_n]), reconcile=count(reconcile_reqs), per_kind=per_kind,
                rss_baseline_mib=rss_baseline, rss_ready_mib=rss_ready, rss_peak_mib=rss_mib(),
                rss_end_mib=rss_end, status_hits=status_hits, operator_cpu_s=cpu_reconcile,
            )


def render(res: Result, status_interval: float) -> str:
    n = res.count
    r = res.reconcile
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("kopf", "kmock", "aiohttp"))
    cpu_ms = res.operator_cpu_s / n * 1000
    rows = "\n".join(f"| `{k}` | {v} | {v / n:.2f} |" for k, v in sorted(res.per_kind.items(), key=lambda kv: -kv[1]))
    return f"""{SECTION_BEGIN}
## Operator: reconciling {n} Federations against kmock (`operator_reconcile.py`)

Run on {dt.date.today().isoformat()}; machine: {os.cpu_count()} CPUs (`nproc`), {cpu_model()};
Python {platform.python_version()}, {versions}. There is no peer to compare against: these are absolute
numbers for Federator's kopf operator. The operator runs in a thread of the benchmark process (as in the
integration tests) against kmock's `KubernetesEmulator` over HTTP on 127.0.0.1 (the tests' `ApiServer`);
the {n} Federations (10 clients, 5 rounds each) are created one after the other over HTTP. Each
server's `/status` is a tiny local fake answering "Pending", polled every {status_interval:g} s.

| measure | value |
|---|---:|
| creating the {n} Federations (sequential POSTs) | {res.create_s:.2f} s |
| first create until all {n * len(CHILDREN)} children exist ({len(CHILDREN)} per Federation) | {res.children_s:.2f} s |
| first create until the operator's last write (each Federation's first `/status` poll included) | {res.quiet_s:.2f} s |
| operator CPU time for the {n} (its thread, after start-up) | {res.operator_cpu_s:.2f} s ({cpu_ms:.0f} ms each) |
| API requests per Federation: reads (GET, list, watch) | {r.reads / n:.2f} |
| API requests per Federation: writes (POST/PUT/PATCH/DELETE) | {r.writes / n:.2f} |
| API requests per Federation: events posted | {r.events / n:.2f} |
| API requests per Federation: total | {r.total / n:.2f} |
| operator start-up requests (discovery, lists, watches) | {res.startup.reads} reads, {res.startup.writes} writes |
| `/status` polls during the run (all Federations) | {res.status_hits} |
| process RSS before the operator starts (emulator, imports) | {res.rss_baseline_mib:.0f} MiB |
| process RSS with the operator idle | {res.rss_ready_mib:.0f} MiB |
| process RSS after reconciling {n} (current) | {res.rss_end_mib:.0f} MiB |
| process peak RSS (`getrusage` `ru_maxrss`) | {res.rss_peak_mib:.0f} MiB |

Requests after start-up, by method and resource (the benchmark's own {n} creates excluded):

| request | count | per Federation |
|---|---:|---:|
{rows}

Memory is the RSS of the whole process: the operator, but also the emulator holding every object and
request it saw, so the growth over the baseline ({res.rss_peak_mib - res.rss_baseline_mib:.0f} MiB) is an upper bound
on what the operator needs for {n} Federations. One run; timings on a shared machine vary by tens of
percent. The emulator is single-process Python and shares the two cores and the GIL with the operator,
so it is part of the wall-clock times: kmock matches every request against its reactions with regular
expressions, which costs more CPU than the operator's own work. The operator's CPU time (read from its
thread's clock) is the number that would carry over to a real API server; the wall-clock times are an
upper bound.
{SECTION_END}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=100, help="Federations to create (default 100)")
    parser.add_argument("--status-interval", type=float, default=30.0, help="seconds between /status polls")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    started = time.monotonic()
    res = asyncio.run(bench(args.count, args.status_interval))
    section = render(res, args.status_interval)
    print(section)
    print(f"(benchmark wall time {time.monotonic() - started:.1f} s)")
    if not args.no_doc:
        write_section(section, SECTION_BEGIN, SECTION_END)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
