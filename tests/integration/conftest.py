"""Fixtures for the real kopf operator against kmock's KubernetesEmulator over HTTP.

kmock stores objects as it gets them. `ApiServer` adds what a real API server assigns (uid,
resourceVersion, generation, creationTimestamp, names from generateName, a workload's default
`replicas: 1`), server-side apply's create-or-update and its removal of the fields its manager applied
before and no longer applies, resourceVersion preconditions and the `/status` and `/scale` subresources'
scope. `fail_next()` makes chosen requests fail once. Garbage collection, the HPA and CEL are not
emulated: tests write objects and check how the operator reacts. A fake server answers `GET /status`
like the runtime does, with a payload a test sets.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import threading
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import kopf
import kubernetes.config.kube_config
import pytest
import pytest_asyncio
import yaml
from kmock._internal import dicts as kmock_dicts
from kmock._internal import enums as kmock_enums

import federator.operator.handlers  # noqa: F401  (registers the handlers with kopf)
from federator.api.serverstatus import ServerStatus
from federator.operator.main import operator_options
from federator.operator.reconcile import OperatorConfig

ROOT = Path(__file__).resolve().parents[2]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """KubernetesEmulator plus the fields and semantics of a real API server that the operator relies on."""

    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1000), init=False)
    _lock_rv: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    _latest: int = attrs.field(default=999, init=False)
    # what server-side apply last applied to each object: the fields its manager owns
    _applied: dict[Any, dict[str, Any]] = attrs.field(factory=dict, init=False)
    # URL path -> the manifest server-side apply got last, as sent
    last_applied: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)
    # (method, path, content-type prefix) -> how many more such requests fail with 500
    _failures: dict[tuple[str, str, str], int] = attrs.field(factory=dict, init=False)
    _failure_status: dict[tuple[str, str, str], int] = attrs.field(factory=dict, init=False)

    def fail_next(self, method: str, path: str, content_type: str = "", times: int = 1, status: int = 500) -> None:
        """Make the next `times` requests `method path` (with that Content-Type prefix) fail with `status`."""
        self._failures[method.upper(), path, content_type] = times
        self._failure_status[method.upper(), path, content_type] = status

    def failures_left(self, method: str, path: str, content_type: str = "") -> int:
        return self._failures.get((method.upper(), path, content_type), 0)

    def _inject_failure(self, request: kmock.Request) -> None:
        for (method, path, content_type), left in self._failures.items():
            if left > 0 and str(request.method).upper().endswith(method) and request.url.path == path \
                    and request.headers.get("Content-Type", "").startswith(content_type):
                self._failures[method, path, content_type] = left - 1
                raise kmock.KubernetesError(status=self._failure_status[method, path, content_type],
                                            reason="Injected", message="injected by the test")

    def next_version(self) -> str:
        with self._lock_rv:
            self._latest = next(self._versions)
            return str(self._latest)

    async def _serve_list(self, request: kmock.Request) -> Any:
        """kmock's list, with the resourceVersion a watch continues from."""
        result: Any = await super()._serve_list(request)
        result["metadata"] = {"resourceVersion": str(self._latest)}
        return result

    def _fill_new(self, data: dict[str, Any], namespace: str | None, name: str | None) -> None:
        meta = data.setdefault("metadata", {})
        if name and not meta.get("name"):
            meta["name"] = name
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if namespace and not meta.get("namespace"):
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self.next_version()
        meta["generation"] = 1
        meta["creationTimestamp"] = _now()
        if data.get("kind") in ("Federation", "FederatedClient"):
            data.pop("status", None)  # the status subresource ignores status on create
        if data.get("kind") in WORKLOADS and isinstance(data.get("spec"), dict):
            data["spec"].setdefault("replicas", 1)  # the API server's default

    namespaces: tuple[str, ...] = ("default", "team-b")

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8 fails to parse the cluster-scoped `/api/v1/namespaces`, which kopf lists and watches
        # when it is given namespaces: serve the list, and a watch that stays quiet.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            await raw_request.read()
            if raw_request.query.get("watch") in ("true", "1"):
                response = aiohttp.web.StreamResponse()
                await response.prepare(raw_request)
                await asyncio.sleep(3600)  # cancelled when kopf disconnects or the server stops
                return response
            return aiohttp.web.json_response({
                "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": str(self._latest)},
                "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in self.namespaces],
            })
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None:
            self._inject_failure(request)
            assigned = self._assign(request)
            if assigned is not request:  # kmock matches reactions by the identity of recorded requests
                self._requests[:] = [assigned if r is request else r for r in self._requests]
                request = assigned
        return await super()._handle(request)

    def _assign(self, request: kmock.Request) -> kmock.Request:
        data = request.data
        if request.action == kmock_enums.action.CREATE and isinstance(data, dict):
            self._fill_new(data, request.namespace, None)
            self._applied.pop((request.resource, request.namespace, (data.get("metadata") or {}).get("name")), None)
            return request
        key: Any = (request.resource, request.namespace, request.name)
        exists = key in self.objects and not self.objects[key].deleted
        if request.action == kmock_enums.action.DELETE:
            self._applied.pop(key, None)
        if request.action == kmock_enums.action.DELETE and exists:
            meta = self.objects[key]["metadata"]
            if meta.get("finalizers") and not meta.get("deletionTimestamp"):
                self.objects[key].last.raw["metadata"]["resourceVersion"] = self.next_version()
            return request
        if request.action == kmock_enums.action.UPDATE and isinstance(data, list) and exists:
            return self._json_patch(request, data, self.objects[key].raw)
        if request.action != kmock_enums.action.UPDATE or not isinstance(data, dict):
            return request
        is_apply = request.headers.get("Content-Type", "").startswith("application/apply-patch")
        if is_apply:
            self.last_applied[request.url.path] = copy.deepcopy(data)
        if not exists:
            if is_apply:  # server-side apply creates what does not exist
                self._applied[key] = copy.deepcopy(data)
                self._fill_new(data, request.namespace, request.name)
                return attrs.evolve(request, action=kmock_enums.action.CREATE, method=kmock_enums.method.POST)
            return request
        live = self.objects[key].raw
        if live.get("kind") == "StatefulSet" and request.subresource is None:
            _refuse_immutable_statefulset_change(live, data)
        if is_apply:  # the fields applied before and not now are removed (defaulted where the server would)
            applied = copy.deepcopy(data)
            _drop_unapplied(data, self._applied.get(key) or {}, default_replicas=live.get("kind") in WORKLOADS)
            self._applied[key] = applied
        meta = data.setdefault("metadata", {})
        expected = meta.get("resourceVersion")
        if expected is not None and expected != live["metadata"].get("resourceVersion"):
            raise kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
        for field in ("uid", "creationTimestamp", "generation"):
            meta.pop(field, None)
        if request.subresource == "status":
            for field in [k for k in data if k not in ("status", "metadata")]:
                del data[field]
        elif "spec" in data:
            new_spec = kmock_dicts.patch_dict(copy.deepcopy(live.get("spec") or {}), data["spec"])
            if new_spec != live.get("spec"):
                meta["generation"] = int(live["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = self.next_version()
        return request

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        """kmock's watch, but subscribed to the event bus *before* the initial replay.

        (kmock 0.8 replays first and subscribes after, so a change made in between is never streamed;
        kopf patches objects exactly then, while the watch is connecting after its initial list.)
        """
        yield b""
        assert request.resource is not None
        bus = self._buses[request.resource]
        marker = await bus.mark()
        try:
            since = request.params.get("resourceVersion", "")
            since_version = int(since) if since.isdigit() else -1  # a watch after a list: only newer changes
            async with self._lock:
                replay = [
                    {"type": "ADDED", "object": obj.raw}
                    for (resource, namespace, name), obj in self.objects.items()
                    if resource == request.resource and not obj.deleted and self._selected(request, namespace, name)
                    and int(obj.raw["metadata"].get("resourceVersion", 0)) > since_version
                ]
            for event in replay:
                yield event
            async for event in bus.stream(since=marker):
                meta = (event.get("object") or {}).get("metadata") or {}
                if self._selected(request, meta.get("namespace"), meta.get("name")):
                    yield event
        finally:
            await bus.unmark(marker)

    @staticmethod
    def _selected(request: kmock.Request, namespace: str | None, name: str | None) -> bool:
        return (request.namespace is None or namespace == request.namespace) and (
            request.name is None or name == request.name)

    def _json_patch(self, request: kmock.Request, ops: list[Any], live: dict[str, Any]) -> kmock.Request:
        """JSON patch (kopf's finalizers): a failed `test` op is 422, as on a real API server."""
        try:
            patched = jsonpatch.apply_patch(copy.deepcopy(live), ops)
        except jsonpatch.JsonPatchException as exc:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
        ops.append({"op": "replace", "path": "/metadata/resourceVersion", "value": self.next_version()})
        if request.subresource is None and patched.get("spec") != live.get("spec"):
            generation = int(live["metadata"].get("generation", 1)) + 1
            ops.append({"op": "replace", "path": "/metadata/generation", "value": generation})
        return request


WORKLOADS = ("Deployment", "StatefulSet")


STATEFULSET_MUTABLE = ("replicas", "ordinals", "template", "updateStrategy", "persistentVolumeClaimRetentionPolicy",
                       "minReadySeconds")


def _refuse_immutable_statefulset_change(live: dict[str, Any], data: dict[str, Any]) -> None:
    """422, as the API server answers a change to a StatefulSet's spec outside its mutable fields."""
    spec = data.get("spec") or {}
    changed = [k for k in spec if k not in STATEFULSET_MUTABLE and spec[k] != (live.get("spec") or {}).get(k)]
    if changed:
        raise kmock.KubernetesError(status=422, reason="Invalid", message=(
            f"StatefulSet.apps {live['metadata']['name']!r} is invalid: spec: Forbidden: updates to statefulset "
            f"spec for fields other than {', '.join(repr(f) for f in STATEFULSET_MUTABLE)} are forbidden"))


def _drop_unapplied(data: dict[str, Any], before: dict[str, Any], *, default_replicas: bool) -> None:
    """Mark (None) every key of `before` that `data` lacks, recursively, as server-side apply removes the
    fields its manager no longer applies; a workload's removed `spec.replicas` goes back to its default."""
    for key, old in before.items():
        if key not in data:
            data[key] = None
        elif isinstance(old, dict) and isinstance(data[key], dict):
            _drop_unapplied(data[key], old, default_replicas=False)
    spec = data.get("spec")
    if default_replicas and isinstance(spec, dict) and "replicas" in spec and spec["replicas"] is None:
        spec["replicas"] = 1


CHILD_RESOURCES = {  # the kinds of children the operator watches (kopf discovers them)
    "v1/configmaps": ("ConfigMap", "configmap"),
    "v1/secrets": ("Secret", "secret"),
    "v1/services": ("Service", "service"),
    "apps/v1/deployments": ("Deployment", "deployment"),
    "apps/v1/statefulsets": ("StatefulSet", "statefulset"),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", "horizontalpodautoscaler"),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", "poddisruptionbudget"),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", "networkpolicy"),
}
SERVICE_MONITORS = "monitoring.coreos.com/v1/servicemonitors"


def child_resource(kind: str, singular: str) -> kmock.ResourceInfo:
    return kmock.ResourceInfo(kind=kind, singular=singular, namespaced=True,
                              verbs={"get", "list", "watch", "create", "update", "patch", "delete"})


def install_service_monitors(api: ApiServer) -> None:
    """The Prometheus Operator's ServiceMonitor CRD appears in the cluster."""
    api.resources[SERVICE_MONITORS] = child_resource("ServiceMonitor", "servicemonitor")


BACKBONE = {  # what kopf discovers before it starts: namespaces, CRDs, events
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", singular="namespace", namespaced=False,
                                        verbs={"get", "list", "watch"}),
    "v1/events": kmock.ResourceInfo(kind="Event", singular="event", namespaced=True,
                                    verbs={"create", "get", "list", "watch"}),
    # kopf's peering (leader election between replicas); its CRDs come with kopf
    "kopf.dev/v1/clusterkopfpeerings": kmock.ResourceInfo(kind="ClusterKopfPeering", singular="clusterkopfpeering",
                                                          namespaced=False, verbs={"get", "list", "watch", "patch"}),
    "kopf.dev/v1/kopfpeerings": kmock.ResourceInfo(kind="KopfPeering", singular="kopfpeering", namespaced=True,
                                                   verbs={"get", "list", "watch", "patch"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False,
        verbs={"get", "list", "watch"}),
}


def crd_resources(api: ApiServer) -> None:
    """Declare the backbone and Federator's resources for kopf's discovery (from the checked-in CRDs)."""
    for key, info in BACKBONE.items():
        api.resources[key] = info
    for key, (kind, singular) in CHILD_RESOURCES.items():
        api.resources[key] = child_resource(kind, singular)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        version = spec["versions"][0]
        api.resources[f"{spec['group']}/{version['name']}/{spec['names']['plural']}"] = kmock.ResourceInfo(
            kind=spec["names"]["kind"],
            singular=spec["names"]["singular"],
            namespaced=spec["scope"] == "Namespaced",
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            shortnames=set(spec["names"]["shortNames"]),
            categories=set(spec["names"]["categories"]),
            subresources=set(version.get("subresources", {})),
        )


@pytest_asyncio.fixture()
async def kube_api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server, kmock.Server(server):
        crd_resources(server)
        yield server


def kubeconfig_for(api: ApiServer) -> dict[str, Any]:
    """A kubeconfig that points kopf and the `kubernetes` loaders at the emulator."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": str(api.url).rstrip("/")}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": "default"}}],
        "current-context": "kmock",
    }


@pytest.fixture()
def kubeconfig(kube_api: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig_for(kube_api)))
    monkeypatch.setenv("KUBECONFIG", str(path))
    # The kubernetes package reads $KUBECONFIG once, when imported; kopf and kube.py both use its loader.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return path


class FakeServers:
    """The `/status` endpoint of every federation's server: a test sets the payload per federation."""

    def __init__(self) -> None:
        self.reports: dict[tuple[str, str], Any] = {}  # (namespace, name) -> payload; absent: 503
        self.hits: dict[tuple[str, str], int] = {}
        self.url = ""

    def set(self, name: str, payload: Any, namespace: str = "default") -> None:
        self.reports[(namespace, name)] = payload

    def down(self, name: str, namespace: str = "default") -> None:
        self.reports.pop((namespace, name), None)

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        self.hits[key] = self.hits.get(key, 0) + 1
        if key not in self.reports:
            return aiohttp.web.Response(status=503, text="server not running")
        payload = self.reports[key]
        if isinstance(payload, str):
            return aiohttp.web.Response(text=payload, content_type="application/json")
        return aiohttp.web.json_response(payload)


@pytest_asyncio.fixture()
async def status_servers() -> AsyncIterator[FakeServers]:
    async with serve_fake_status() as fakes:
        yield fakes


@asynccontextmanager
async def serve_fake_status() -> AsyncIterator[FakeServers]:
    """Every federation's server `/status` on one local port: `{url}/{namespace}/{name}/status`."""
    fakes = FakeServers()
    app = aiohttp.web.Application()
    app.router.add_get("/{namespace}/{name}/status", fakes.handle)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fakes.url = f"http://127.0.0.1:{port}"
    try:
        yield fakes
    finally:
        await runner.cleanup()


def server_report(name: str, **overrides: Any) -> dict[str, Any]:
    """A `/status` payload as the runtime's server sends it (through the same model)."""
    report: dict[str, Any] = {
        "federation": name, "phase": "Running", "round": 3, "rounds": 15, "accuracy": 0.81, "loss": 0.52,
        "epsilon": None, "clients": {"connected": 2, "participants": 10}, "byzantineFlagged": 0,
        "compressionRatio": None, "pendingTasks": 4, "message": "", "silos": {},
    }
    report.update(overrides)
    return ServerStatus.model_validate(report).payload()


OperatorRunner = Callable[..., Any]


@pytest.fixture()
def run_operator(kubeconfig: Path, status_servers: FakeServers) -> OperatorRunner:
    """`async with run_operator(): ...` runs the real kopf operator while inside (see `operator_thread`)."""

    @asynccontextmanager
    async def run(namespaces: list[str] | None = None, peering: str | None = None, priority: int | None = None,
                  **config: Any) -> AsyncIterator[kopf.Memo]:
        options = operator_options(namespaces, peering, priority)  # as `federator operator` passes them
        settings: dict[str, Any] = dict(
            status_interval=0.1, status_timeout=2.0, startup_grace=0.0, retry_delay=0.3,
            status_url_template=status_servers.url + "/{namespace}/{name}/status",
        )
        settings.update(config)
        memo = kopf.Memo(config=OperatorConfig(**settings))
        async with operator_thread(memo, options):
            yield memo

    return run


@asynccontextmanager
async def operator_thread(memo: kopf.Memo, options: dict[str, Any], start_timeout: float = 10.0,
                          stop_timeout: float = 15.0) -> AsyncIterator[threading.Thread]:
    """The real kopf operator in its own thread and event loop while inside; yields that thread.

    As in production, kopf at exit waits for (and then cancels) every task of its loop, which must not
    include the emulator's. Failing to start or stop, or an error inside kopf, fails the caller.
    """
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(kopf.operator(
                memo=memo, stop_flag=stop, ready_flag=ready, settings=kopf.OperatorSettings(), **options,
            ))
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)

    thread = threading.Thread(target=target, name="kopf-operator", daemon=True)
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, start_timeout), "the operator did not start"
        yield thread
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, stop_timeout)
        assert not thread.is_alive(), "the operator did not stop"
        assert not errors, "".join(traceback.format_exception(errors[0]))


async def eventually(check: Callable[[], Any], *, timeout: float = 10.0, message: str = "") -> Any:
    """Wait until `check()` returns something truthy (or stops raising AssertionError/KeyError)."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError, ValueError) as exc:
            last = exc
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out: {message or check}; last error: {last!r}")
        await asyncio.sleep(0.05)


async def settle(api: ApiServer, quiet: float = 0.6, timeout: float = 10.0) -> None:
    """Wait until the operator has sent no request for `quiet` seconds (besides watching and polling)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    count = len(writes(api))
    since = loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.05)
        now_count = len(writes(api))
        if now_count != count:
            count, since = now_count, loop.time()
        elif loop.time() - since >= quiet:
            return
    recent = [f"{r.method} {r.url.path}" for r in writes(api)[-5:]]
    raise AssertionError(f"the operator kept writing: {recent}")


def writes(api: ApiServer) -> list[kmock.Request]:
    """Mutating requests the emulator received (events excluded)."""
    return [
        r for r in api
        if r.method in (kmock.method.POST, kmock.method.PATCH, kmock.method.DELETE, kmock.method.PUT)
        and not (r.resource is not None and r.resource.plural == "events")
    ]


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)


Waiter = Callable[..., Awaitable[Any]]
