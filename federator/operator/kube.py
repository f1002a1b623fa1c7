"""The only module that talks to the Kubernetes API (kopf's own watching aside).

A small asyncio client over aiohttp. Credentials come from the `kubernetes` package's loaders (in-cluster
service account first, then kubeconfig), so every authentication method it knows works here too.

`apply()` is server-side apply (`fieldManager=federator`, `force=true`), preceded by a read. Every applied
object carries a hash of the manifest it was applied from (annotation `federator.dev/applied-hash`).
Nothing is sent when the live object carries the hash of the desired manifest *and* still holds every
field of it: so a second reconcile pass issues no mutating request at all, a restarted operator adopts
what exists without churn, a field dropped from the desired manifest changes the hash (and server-side
apply removes it from the cluster), and a field someone edited by hand is applied back.

`Kube.written` remembers, per object, the manifest this process last left it at (applied, created, or
found current). A watch event whose object is still as left (`left_as_written`) was caused by the
operator's own write: the owner's reconcile would write nothing, so drift repair need not wake it.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from federator.api.models import API_VERSION
from federator.operator.metrics import API_REQUESTS, api_outcome

logger = logging.getLogger(__name__)

FIELD_MANAGER = "federator"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "federator"
APPLIED_HASH_ANNOTATION = "federator.dev/applied-hash"

# (apiVersion, kind) -> plural: the kinds Federator reads or writes; no discovery round-trips needed.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "Service"): "services",
    ("v1", "Event"): "events",
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    (API_VERSION, "Federation"): "federations",
    (API_VERSION, "FederatedClient"): "federatedclients",
}

# Stateless kinds whose immutable fields (a selector) may only change by deleting and re-creating them.
RECREATE_ON_IMMUTABLE = {"Deployment", "PodDisruptionBudget"}
# Kinds that hold the checkpoint: never deleted by the operator, for any reason (an immutable-field change
# is refused instead; see immutable.py), so no request of this client can lose a completed round.
NEVER_DELETED = {"StatefulSet", "PersistentVolumeClaim"}

# HTTP method -> the Kubernetes verb it is (a GET of a collection is a `list`: `Kube.list` says so)
VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}

ApplyOutcome = Literal["unchanged", "applied", "recreated"]


class ApiError(Exception):
    """A failed API request, with the Status the server sent."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class ImmutableFieldError(Exception):
    """The API server refused (422) a change to a kind that is never deleted to apply a change."""

    def __init__(self, kind: str, name: str, reason: str) -> None:
        super().__init__(f"{kind} {name}: {reason}")
        self.kind = kind
        self.name = name
        self.reason = reason


class ForeignObjectError(Exception):
    """A child's name is taken by an object Federator does not manage: it is never overwritten."""


def plural_of(api_version: str, kind: str) -> str:
    try:
        return PLURALS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"unknown kind {api_version}/{kind}") from None


def path_of(
    api_version: str, plural: str, namespace: str | None, name: str | None = None, subresource: str | None = None
) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [base]
    if namespace is not None:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name is not None:
        parts.append(name)
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


def covers(live: Any, desired: Any) -> bool:
    """Whether `live` already holds every field of `desired` with the same value.

    Extra fields in `live` (defaults, status, other managers' fields) are fine. Lists must have the same
    length and each item must be covered. Numbers compare by value (1 == 1.0).
    """
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(k in live and covers(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(
            covers(a, b) for a, b in zip(live, desired, strict=True))
    if isinstance(desired, bool) or isinstance(live, bool):
        return live is desired
    return bool(live == desired)


def applied_hash(manifest: Mapping[str, Any]) -> str:
    """A hash of a desired manifest (its own applied-hash annotation left out)."""
    bare = copy.deepcopy(dict(manifest))
    annotations = (bare.get("metadata") or {}).get("annotations") or {}
    annotations.pop(APPLIED_HASH_ANNOTATION, None)
    if "metadata" in bare and not annotations:
        bare["metadata"].pop("annotations", None)
    return hashlib.sha256(json.dumps(bare, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


def with_applied_hash(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest as applied: with the hash of itself in its annotations (the input is not changed)."""
    out = copy.deepcopy(dict(manifest))
    meta = out.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), APPLIED_HASH_ANNOTATION: applied_hash(manifest)}
    return out


def is_current(live: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether `live` was applied from `desired` (same hash) and nobody has changed its fields since."""
    annotations = (live.get("metadata") or {}).get("annotations") or {}
    return annotations.get(APPLIED_HASH_ANNOTATION) == applied_hash(desired) and covers(live, desired)


ObjectKey = tuple[str, str, str, str]  # apiVersion, kind, namespace, name


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return str(obj.get("apiVersion")), str(obj.get("kind")), str(meta.get("namespace")), str(meta.get("name"))


def left_as_written(live: Mapping[str, Any], written: Mapping[str, Any] | None) -> bool:
    """Whether `live` is still what the operator wrote (`written`): a reconcile would not write it again.

    An applied manifest (it carries the applied hash) is judged as `apply()` judges it (`is_current`);
    another (the credentials Secret) must be covered and hold the same data keys, none added or removed.
    """
    if written is None:
        return False
    if APPLIED_HASH_ANNOTATION in ((written.get("metadata") or {}).get("annotations") or {}):
        return is_current(live, written)
    return covers(live, written) and set(live.get("data") or {}) == set(written.get("data") or {})


def is_managed(obj: Mapping[str, Any]) -> bool:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY


@dataclass
class Connection:
    """Where the API server is and how to authenticate to it."""

    server: str
    ssl_context: ssl.SSLContext | None = None
    authorization: Callable[[], str | None] = lambda: None


def load_connection() -> Connection:
    """In-cluster service account, else kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    import kubernetes  # heavy: loaded only when the operator starts

    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=cfg)

    def authorization() -> str | None:
        hook = getattr(cfg, "refresh_api_key_hook", None)
        if hook is not None:
            hook(cfg)  # re-reads a rotated service-account token when it is due
        header: str | None = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
            "authorization")
        if header:
            return header if " " in header else f"Bearer {header}"
        if cfg.username:
            basic: str | None = cfg.get_basic_auth_token()
            return basic
        return None

    context: ssl.SSLContext | None = None
    if str(cfg.host).startswith("https"):
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        if not cfg.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    return Connection(server=str(cfg.host).rstrip("/"), ssl_context=context, authorization=authorization)


@dataclass
class Kube:
    """An API client bound to one connection. Create it inside the running event loop."""

    connection: Connection
    timeout: float = 30.0
    field_manager: str = FIELD_MANAGER
    requests: dict[str, int] = field(default_factory=dict)  # method -> count (for tests and benchmarks)
    written: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)  # see `left_as_written`
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    @classmethod
    def from_environment(cls) -> Kube:
        return cls(load_connection())

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed:  # a handler still running after the operator's cleanup must not open a new one
            raise RuntimeError("the Kubernetes API client is closed: the operator is exiting")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.connection.ssl_context or False, limit=32)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None and not self._session.closed:
            await self._session.close()
            await asyncio.sleep(0)  # let the connector close its transports

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        verb: str | None = None,
    ) -> Any:
        """One request; counted in federator_operator_api_requests_total by `verb` (default: the method's)."""
        headers = {"Accept": "application/json"}
        auth = self.connection.authorization()
        if auth:
            headers["Authorization"] = auth
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        self.requests[method] = self.requests.get(method, 0) + 1
        answered: int | None = None
        try:
            async with self.session.request(
                method, self.connection.server + path, data=data, headers=headers, params=params
            ) as resp:
                answered = resp.status
                text = await resp.text()
        finally:
            API_REQUESTS.labels(verb or VERBS.get(method, method.lower()), api_outcome(answered)).inc()
        if resp.status >= 400:
            try:
                status = json.loads(text)
                reason, message = str(status.get("reason", "")), str(status.get("message", text))
            except ValueError:
                reason, message = resp.reason or "", text[:500]
            raise ApiError(resp.status, reason, message)
        return json.loads(text) if text else None

    def remember(self, manifest: Mapping[str, Any]) -> None:
        """Record that this process left an object as `manifest` says (after a write, or finding it so)."""
        self.written[object_key(manifest)] = copy.deepcopy(dict(manifest))

    def left_as_written(self, live: Mapping[str, Any]) -> bool:
        """Whether `live` is as this process last left it (see the module's docstring)."""
        return left_as_written(live, self.written.get(object_key(live)))

    # ------------------------------------------------------------------------------------- reading

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await self.request(
                "GET", path_of(api_version, plural_of(api_version, kind), namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    async def list(
        self, api_version: str, kind: str, namespace: str, *, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self.request(
            "GET", path_of(api_version, plural_of(api_version, kind), namespace), params=params, verb="list")
        items: list[dict[str, Any]] = (result or {}).get("items") or []
        return items

    async def has_resource(self, api_version: str, plural: str) -> bool:
        """Whether the API serves a resource (e.g. ServiceMonitor, whose CRD may not be installed)."""
        try:
            result = await self.request("GET", path_of(api_version, "", None).rstrip("/"))
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in (result or {}).get("resources") or [])

    async def ping(self) -> None:
        await self.request("GET", "/version")

    # ------------------------------------------------------------------------------------- writing

    async def apply(self, desired: Mapping[str, Any]) -> ApplyOutcome:
        """Server-side apply, skipped when the live object is current (see `is_current`).

        A 422 (an immutable field) re-creates a stateless kind and raises ImmutableFieldError for the others.
        """
        manifest = with_applied_hash(desired)
        api_version, kind = manifest["apiVersion"], manifest["kind"]
        meta = manifest["metadata"]
        live = await self.get(api_version, kind, meta["namespace"], meta["name"])
        if live is not None:
            if not is_managed(live):
                raise ForeignObjectError(
                    f"{kind} {meta['namespace']}/{meta['name']} exists and is not managed by Federator; "
                    f"rename or delete it")
            if is_current(live, manifest):
                self.remember(manifest)
                return "unchanged"
        self.written.pop(object_key(manifest), None)
        try:
            await self._server_side_apply(manifest)
        except ApiError as exc:
            if exc.status == 422 and kind in NEVER_DELETED and live is not None:
                raise ImmutableFieldError(kind, meta["name"], exc.message) from None
            if exc.status != 422 or kind not in RECREATE_ON_IMMUTABLE or live is None:
                raise
            logger.info("re-creating %s %s/%s: %s", kind, meta["namespace"], meta["name"], exc.message)
            await self.delete(api_version, kind, meta["namespace"], meta["name"])
            await self._server_side_apply(manifest)
            self.remember(manifest)
            return "recreated"
        self.remember(manifest)
        return "applied"

    async def _server_side_apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        api_version, kind = manifest["apiVersion"], manifest["kind"]
        meta = manifest["metadata"]
        result: dict[str, Any] = await self.request(
            "PATCH",
            path_of(api_version, plural_of(api_version, kind), meta["namespace"], meta["name"]),
            body=manifest,
            content_type="application/apply-patch+yaml",  # JSON is YAML
            params={"fieldManager": self.field_manager, "force": "true"},
        )
        return result

    async def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        api_version, kind = manifest["apiVersion"], manifest["kind"]
        meta = manifest["metadata"]
        result: dict[str, Any] = await self.request(
            "POST", path_of(api_version, plural_of(api_version, kind), meta["namespace"]), body=manifest,
            params={"fieldManager": self.field_manager},
        )
        return result

    async def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch; include metadata.resourceVersion in it for an optimistic lock (409)."""
        result: dict[str, Any] = await self.request(
            "PATCH",
            path_of(api_version, plural_of(api_version, kind), namespace, name, subresource),
            body=patch,
            content_type="application/merge-patch+json",
            params={"fieldManager": self.field_manager},
        )
        return result

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete (background propagation); False if it was not there. Never a kind in NEVER_DELETED."""
        if kind in NEVER_DELETED:
            raise ValueError(f"Federator never deletes a {kind} ({namespace}/{name}): it may hold the checkpoint")
        self.written.pop((api_version, kind, namespace, name), None)
        try:
            await self.request(
                "DELETE",
                path_of(api_version, plural_of(api_version, kind), namespace, name),
                body={"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"},
            )
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def delete_if_managed(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Prune a child the spec no longer asks for, never an object someone else made."""
        live = await self.get(api_version, kind, namespace, name)
        if live is None or not is_managed(live):
            return False
        return await self.delete(api_version, kind, namespace, name)
