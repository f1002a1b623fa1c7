"""What each kopf handler does, step by step: parse, build (children.py), apply (kube.py), report
(status.py). `handlers.py` only registers these with kopf.

Errors follow kopf's contract: an invalid spec is `kopf.PermanentError` (after a condition and a Warning
event, before any child exists); something not ready yet is `kopf.TemporaryError(delay=...)`. The
permanent ones are the subclasses of metrics.py, so that a reconcile pass is counted by its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
from pydantic import BaseModel, ValidationError

from federator.api.manifest import format_validation_error
from federator.api.models import API_VERSION, FederatedClient, Federation
from federator.api.serverstatus import ServerStatus
from federator.operator import children, drift, immutable, secrets, status
from federator.operator.kube import (
    NEVER_DELETED,
    ApiError,
    ForeignObjectError,
    ImmutableFieldError,
    Kube,
    is_managed,
    left_as_written,
    object_key,
)
from federator.operator.metrics import PHASES, InvalidSpecError, RefusedChangeError

FILE_DATASETS = ("npz", "csv", "imagefolder")


@dataclasses.dataclass
class OperatorConfig:
    """Knobs of the operator (environment variables in brackets)."""

    status_interval: float = 15.0  # seconds between reads of a server's /status [FEDERATOR_STATUS_INTERVAL]
    # where a server's /status is [FEDERATOR_STATUS_URL_TEMPLATE]; {name} {namespace} {port}
    status_url_template: str = "http://{name}-server.{namespace}.svc:{port}/status"
    status_timeout: float = 5.0  # [FEDERATOR_STATUS_TIMEOUT]
    startup_grace: float = 180.0  # a new server may not answer for this long [FEDERATOR_STARTUP_GRACE]
    retry_delay: float = 15.0  # delay of TemporaryError retries [FEDERATOR_RETRY_DELAY]
    # seconds between level-triggered passes over every object; a changed child wakes its owner's pass at
    # once, so this only bounds what no watch event reports [FEDERATOR_RESYNC_INTERVAL]
    resync_interval: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        base = cls()
        return cls(
            status_interval=float(env.get("FEDERATOR_STATUS_INTERVAL", base.status_interval)),
            status_url_template=env.get("FEDERATOR_STATUS_URL_TEMPLATE", base.status_url_template),
            status_timeout=float(env.get("FEDERATOR_STATUS_TIMEOUT", base.status_timeout)),
            startup_grace=float(env.get("FEDERATOR_STARTUP_GRACE", base.startup_grace)),
            retry_delay=float(env.get("FEDERATOR_RETRY_DELAY", base.retry_delay)),
            resync_interval=float(env.get("FEDERATOR_RESYNC_INTERVAL", base.resync_interval)),
        )

    def status_url(self, name: str, namespace: str, port: int) -> str:
        return self.status_url_template.format(name=name, namespace=namespace, port=port)


def utcnow() -> str:
    return status.format_time(datetime.datetime.now(datetime.UTC))


# ------------------------------------------------------------------------------------------ parsing


class InvalidSpec(ValueError):
    """A spec the operator cannot serve; the message names each field."""


def _manifest(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "annotations") if k in meta},
        "spec": dict(body.get("spec") or {}),
    }


def _validate(model: type[Federation | FederatedClient], body: Mapping[str, Any]) -> Any:
    try:
        return model.model_validate(_manifest(body))
    except ValidationError as exc:
        raise InvalidSpec("; ".join(format_validation_error(exc))) from None


def parse_federation(body: Mapping[str, Any]) -> Federation:
    """Everything the CRD schema checks, and what it cannot: what a cluster cannot serve."""
    fed: Federation = _validate(Federation, body)
    data = fed.spec.data
    if data.dataset in FILE_DATASETS and data.path is not None and not data.path.startswith("/"):
        raise InvalidSpec(
            f"spec.data.path: must be an absolute path inside the runtime image in a cluster "
            f"(got {data.path!r}); silos bring their own data with FederatedClient")
    return fed


def parse_client(body: Mapping[str, Any]) -> FederatedClient:
    client: FederatedClient = _validate(FederatedClient, body)
    return client


def _identity(body: Mapping[str, Any]) -> tuple[str, str, str, int | None]:
    meta = body["metadata"]
    return meta["name"], meta["namespace"], meta.get("uid", ""), meta.get("generation")


# ------------------------------------------------------------------------------------------- status


def _status_lock(memo: Any) -> asyncio.Lock:
    lock: asyncio.Lock | None = memo.get("status_lock")
    if lock is None:
        lock = memo["status_lock"] = asyncio.Lock()
    return lock


def _current_status(memo: Any, body: Mapping[str, Any]) -> dict[str, Any]:
    """What this process last wrote, else what the object carries (after a restart)."""
    last = memo.get("last_status")
    return dict(last) if last is not None else dict(body.get("status") or {})


async def write_status(
    kube: Kube, memo: Any, body: Mapping[str, Any], new: BaseModel, *, kind: str
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Write the status if it changed; returns (old, new) when it did."""
    name, ns, _, _ = _identity(body)
    old = _current_status(memo, body)
    dumped = status.dump(new)
    if not status.changed(old, dumped):
        return None
    await kube.merge_patch(API_VERSION, kind, ns, name, {"status": dumped}, subresource="status")
    memo["last_status"] = {**old, **dumped}
    if kind == "Federation":
        PHASES.set(str((body.get("metadata") or {}).get("uid")), memo["last_status"].get("phase"))
    return old, dumped


def _post(body: kopf.Body, events: list[status.Event]) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


# -------------------------------------------------------------------------------------- credentials


async def ensure_credentials(
    kube: Kube, fed: Federation, uid: str, silos: list[str], *, prune: bool, attempts: int = 5
) -> None:
    """Create the Secret once; later only add (or, with prune, revoke) silo tokens. Optimistic lock."""
    name, ns = fed.metadata.name, fed.metadata.namespace
    owner = children.federation_owner(fed, uid)
    for _ in range(attempts):
        live = await kube.get("v1", "Secret", ns, children.secret_name(name))
        if live is not None and not is_managed(live):
            raise ForeignObjectError(f"Secret {ns}/{children.secret_name(name)} exists and is not managed by Federator")
        existing = children.decode_secret_data(live)
        wanted = secrets.desired_credentials(
            existing, silos, dns_names=children.credential_dns_names(fed), prune=prune)
        manifest = children.credentials_secret(fed, owner, wanted)
        try:
            if live is None:
                await kube.create(manifest)
                kube.remember(manifest)
                return
            if left_as_written(live, manifest):
                kube.remember(manifest)
                return
            removed = {k: None for k in (live.get("data") or {}) if k not in manifest["data"]}
            patch = {
                "metadata": {
                    "resourceVersion": live["metadata"].get("resourceVersion"),
                    "labels": manifest["metadata"]["labels"],
                    "ownerReferences": manifest["metadata"]["ownerReferences"],
                },
                "data": {**manifest["data"], **removed},
            }
            await kube.merge_patch("v1", "Secret", ns, children.secret_name(name), patch)
            kube.remember(manifest)
            return
        except ApiError as exc:
            if exc.status != 409:  # 409: someone wrote it since we read it; read again
                raise
    raise kopf.TemporaryError("the credentials Secret keeps changing under us", delay=1)


async def revoke_silo(kube: Kube, namespace: str, federation: str, silo: str, attempts: int = 5) -> None:
    """Drop a deleted FederatedClient's token from its federation's Secret (if both still exist)."""
    for _ in range(attempts):
        live = await kube.get("v1", "Secret", namespace, children.secret_name(federation))
        if live is None or not is_managed(live):
            return
        existing = children.decode_secret_data(live)
        if secrets.silo_token_key(silo) not in existing:
            return
        encoded = children.encode_secret_data(secrets.without_silo(existing, silo))
        patch = {
            "metadata": {"resourceVersion": live["metadata"].get("resourceVersion")},
            "data": {**encoded, secrets.silo_token_key(silo): None},
        }
        try:
            await kube.merge_patch("v1", "Secret", namespace, children.secret_name(federation), patch)
            return
        except ApiError as exc:
            if exc.status != 409:
                raise
    raise kopf.TemporaryError("the credentials Secret keeps changing under us", delay=1)


# --------------------------------------------------------------------------------------- federation


async def _bound_clients(kube: Kube, namespace: str, federation: str) -> list[tuple[FederatedClient, str]]:
    """The valid FederatedClients of a federation that are not being deleted, with their uids."""
    out = []
    for item in await kube.list(API_VERSION, "FederatedClient", namespace):
        if ((item.get("spec") or {}).get("federationRef") or {}).get("name") != federation:
            continue
        if item["metadata"].get("deletionTimestamp"):
            continue
        try:
            out.append((parse_client(item), item["metadata"].get("uid", "")))
        except InvalidSpec:
            continue  # its own handler reports it
    return sorted(out, key=lambda pair: pair[0].metadata.name)


async def service_monitor_api(kube: Kube, memo: Any, *, refresh: bool) -> bool:
    """Whether the cluster serves ServiceMonitors (the Prometheus Operator may be installed later).

    One answer for the whole operator, asked again on every resync pass (`refresh`).
    """
    apis = memo.setdefault("apis", {})
    if refresh or children.SERVICE_MONITOR_API not in apis:
        apis[children.SERVICE_MONITOR_API] = await kube.has_resource(children.SERVICE_MONITOR_API, "servicemonitors")
    return bool(apis[children.SERVICE_MONITOR_API])


def is_finished(raw_status: Mapping[str, Any] | None) -> bool:
    return (raw_status or {}).get("phase") in status.TERMINAL_PHASES


async def ensure_worker_floor(kube: Kube, fed: Federation) -> bool:
    """An autoscaled worker pool of a running federation never stays at zero: an HPA cannot scale up from
    zero (it stops acting), so a pool at zero (after a finished run resumes, or `kubectl scale --replicas=0`)
    restarts at minReplicas and the HPA takes it from there. True when it patched."""
    auto = fed.spec.clients.autoscaling
    name, ns = children.clients_name(fed.metadata.name), fed.metadata.namespace
    pool = await kube.get("apps/v1", "Deployment", ns, name)
    if pool is None or int((pool.get("spec") or {}).get("replicas", 1)) >= 1:
        return False
    await kube.merge_patch("apps/v1", "Deployment", ns, name, {"spec": {"replicas": max(1, auto.minReplicas)}})
    return True


def below_worker_floor(live: Mapping[str, Any], written: Mapping[str, Any]) -> bool:
    """A Deployment whose replicas its manifest leaves to an HPA, at zero: `ensure_worker_floor`'s case,
    which the pass repairs although the manifest still covers it."""
    return (live.get("kind") == "Deployment" and "replicas" not in (written.get("spec") or {})
            and int((live.get("spec") or {}).get("replicas", 1)) < 1)


def nudge(memo: Any, uid: str) -> bool:
    """Wake the resync daemon of the object with this uid (False when it has none running)."""
    nudges: drift.Nudges | None = memo.get("nudges")
    return nudges is not None and nudges.nudge(uid)


def child_changed(memo: Any, body: Mapping[str, Any], event_type: str | None) -> list[str]:
    """A watch event on a child: wake its owner's resync when the child was deleted or changed.

    `memo` is the child's own (kopf keeps one per object), so it remembers the child's last fingerprint.
    A child still as this operator last left it (the event of its own write) wakes nobody: the owner's
    pass would write nothing (an autoscaled pool at zero apart: see `below_worker_floor`).
    Returns the uids of the owners woken.
    """
    current = drift.fingerprint(body)
    last = memo.get("fingerprint")
    memo["fingerprint"] = current
    kube: Kube | None = memo.get("kube")
    if event_type != "DELETED" and kube is not None and kube.left_as_written(body) and not below_worker_floor(
            body, kube.written.get(object_key(body)) or {}):
        return []
    if not drift.wanted(event_type, last, current):
        return []
    return [uid for uid in drift.owner_uids(body) if nudge(memo, uid)]


async def find_refusal(kube: Kube, fed: Federation, desired: children.Desired) -> immutable.Refusal | None:
    """A change to the server StatefulSet that the cluster cannot apply in place (checked before any apply)."""
    for manifest in desired.apply:
        if manifest["kind"] == "StatefulSet":
            meta = manifest["metadata"]
            live = await kube.get("apps/v1", "StatefulSet", meta["namespace"], meta["name"])
            if live is not None and is_managed(live):
                refusal = immutable.refuse_statefulset_change(fed, live, manifest)
                if refusal is not None:
                    return refusal
    for ref in desired.prune:
        if ref.kind == "StatefulSet":
            live = await kube.get(ref.api_version, ref.kind, ref.namespace, ref.name)
            if live is not None and is_managed(live):
                return immutable.refuse_checkpoint_removal(fed)
    return None


async def refuse(
    kube: Kube, memo: Any, body: kopf.Body, refusal: immutable.Refusal, *, generation: int | None, resync: bool
) -> None:
    """Report a refused change: Ready=False, reason=ImmutableField and a Warning event (once per change)."""
    new = status.federation_refused(_current_status(memo, body), refusal.message, generation=generation, now=utcnow())
    if await write_status(kube, memo, body, new, kind="Federation") is not None:
        kopf.warn(body, reason=status.IMMUTABLE_FIELD, message=refusal.message)
    if not resync:
        raise RefusedChangeError(f"refused: {refusal.message}")


def _being_deleted(body: Mapping[str, Any]) -> bool:
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


async def reconcile_federation(
    *, kube: Kube, config: OperatorConfig, body: kopf.Body, memo: Any, logger: logging.Logger | Any,
    resync: bool = False,
) -> bool:
    """Make every child of a Federation match its spec (level-triggered: safe to run any time).

    `resync`: a pass of the resync daemon (periodic, or woken by a changed child). It re-asks which APIs
    the cluster serves, and leaves an invalid spec to the change handlers, which report it.
    Returns whether it refused a change (an immutable field), which a resync reports without raising.
    """
    name, ns, uid, generation = _identity(body)
    if resync and _being_deleted(body):
        return False
    async with _status_lock(memo):
        try:
            fed = parse_federation(body)
        except InvalidSpec as exc:
            if resync:
                return False
            message = str(exc)
            new = status.federation_invalid(
                _current_status(memo, body), message, generation=generation, now=utcnow())
            await write_status(kube, memo, body, new, kind="Federation")
            PHASES.set(uid, _current_status(memo, body).get("phase"))
            kopf.warn(body, reason=status.INVALID_SPEC, message=message)
            raise InvalidSpecError(f"invalid spec: {message}") from None

        silos = await _bound_clients(kube, ns, name)
        finished = is_finished(_current_status(memo, body))
        try:
            await ensure_credentials(kube, fed, uid, [c.metadata.name for c, _ in silos], prune=True)
            monitor_api = await service_monitor_api(kube, memo, refresh=resync)
            desired = children.federation_children(fed, uid, service_monitor_api=monitor_api, finished=finished)
            refusal = await find_refusal(kube, fed, desired)
            if refusal is not None:  # nothing of this spec is applied: the run goes on as it was
                await refuse(kube, memo, body, refusal, generation=generation, resync=resync)
                return True
            outcomes = [await kube.apply(manifest) for manifest in desired.apply]
            for client, client_uid in silos:
                owner = children.client_owner(client, client_uid)
                outcomes.append(await kube.apply(children.silo_deployment(client, owner, fed)))
            pruned = [
                ref for ref in desired.prune if ref.kind not in NEVER_DELETED
                and await kube.delete_if_managed(ref.api_version, ref.kind, ref.namespace, ref.name)
            ]
            floored = (not finished and fed.spec.clients.autoscaling.enabled
                       and await ensure_worker_floor(kube, fed))
        except ForeignObjectError as exc:
            kopf.warn(body, reason="NameConflict", message=str(exc))
            raise kopf.TemporaryError(str(exc), delay=config.retry_delay) from None
        except ImmutableFieldError as exc:  # a 422 that find_refusal did not foresee
            rejected = immutable.refuse_api_rejection(fed, exc.kind, exc.name, exc.reason)
            await refuse(kube, memo, body, rejected, generation=generation, resync=resync)
            return True

        changed = sum(o != "unchanged" for o in outcomes) + int(floored)
        if changed or pruned:
            logger.info(f"applied {changed} of {len(outcomes)} children, pruned {len(pruned)}")
            kopf.info(body, reason="Reconciled",
                      message=f"applied {changed} children" + (f", deleted {len(pruned)}" if pruned else ""))
        new = status.federation_deployed(
            _current_status(memo, body), generation=generation, rounds=fed.spec.rounds, now=utcnow())
        await write_status(kube, memo, body, new, kind="Federation")
        PHASES.set(uid, _current_status(memo, body).get("phase"))
        return False


async def _fetch(session: aiohttp.ClientSession, url: str, timeout: float) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        if resp.status != 200:
            raise aiohttp.ClientResponseError(
                resp.request_info, resp.history, status=resp.status, message=resp.reason or "")
        return await resp.json(content_type=None)


async def fetch_report(
    session: aiohttp.ClientSession, config: OperatorConfig, fed: Federation
) -> tuple[ServerStatus | None, str | None, bool]:
    """(report, error, bad_report): read a server's /status; never raises for network trouble."""
    url = config.status_url(fed.metadata.name, fed.metadata.namespace, fed.spec.server.metricsPort)
    try:
        payload = await _fetch(session, url, config.status_timeout)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return None, f"{url}: {type(exc).__name__}: {exc}".rstrip(": "), False
    try:
        return status.parse_report(payload), None, False
    except status.BadReport as exc:
        return None, f"{url}: {exc}", True


async def poll_federation(
    *, kube: Kube, session: aiohttp.ClientSession, config: OperatorConfig, body: kopf.Body, memo: Any
) -> None:
    """One read of the server's /status, written to the Federation's status if anything changed."""
    async with _status_lock(memo):
        current = _current_status(memo, body)
        if not status.should_poll(current):
            return
        try:
            fed = parse_federation(body)
        except InvalidSpec:
            return
    report, error, bad = await fetch_report(session, config, fed)
    async with _status_lock(memo):
        current = _current_status(memo, body)
        now = utcnow()
        if report is not None:
            new = status.federation_observed(current, report, now=now)
        else:
            starting = status.in_startup_grace(current, now=now, grace_seconds=config.startup_grace)
            new = status.federation_unreachable(current, error or "no answer", now=now, starting=starting,
                                                bad_report=bad)
        written = await write_status(kube, memo, body, new, kind="Federation")
    if written is not None and is_finished(written[0]) != is_finished(written[1]):
        nudge(memo, _identity(body)[2])  # the worker pool goes to zero, or back: the resync pass does it
    if written is not None:
        _post(body, status.federation_events(*written))


# --------------------------------------------------------------------------------- federated client


async def reconcile_client(
    *, kube: Kube, config: OperatorConfig, body: kopf.Body, memo: Any, logger: logging.Logger | Any,
    resync: bool = False,
) -> None:
    """A FederatedClient's Deployment, bound to its Federation's server, token and config.

    `resync`: a pass of the resync daemon; an invalid spec or a missing Federation is left to the change
    handlers (which report it and retry).
    """
    name, ns, uid, generation = _identity(body)
    if resync and _being_deleted(body):
        return
    if resync:
        try:
            parse_client(body)
        except InvalidSpec:
            return
        with contextlib.suppress(kopf.TemporaryError):  # waiting for its Federation: its handler retries
            await reconcile_client(kube=kube, config=config, body=body, memo=memo, logger=logger)
        return
    async with _status_lock(memo):
        try:
            client = parse_client(body)
        except InvalidSpec as exc:
            message = str(exc)
            new_invalid = status.client_invalid(_current_status(memo, body), message, generation=generation,
                                                now=utcnow())
            await write_status(kube, memo, body, new_invalid, kind="FederatedClient")
            kopf.warn(body, reason=status.INVALID_SPEC, message=message)
            raise InvalidSpecError(f"invalid spec: {message}") from None

        fed_name = client.spec.federationRef.name
        fed_body = await kube.get(API_VERSION, "Federation", ns, fed_name)
        waiting: tuple[str, str] | None = None
        fed: Federation | None = None
        if fed_body is None or fed_body["metadata"].get("deletionTimestamp"):
            waiting = (status.FEDERATION_NOT_FOUND,
                       f"Federation {fed_name!r} not found in namespace {ns!r}; waiting for it")
        else:
            try:
                fed = parse_federation(fed_body)
            except InvalidSpec as exc:
                waiting = ("FederationInvalid", f"Federation {fed_name!r} is invalid: {exc}")
        if waiting is not None or fed is None or fed_body is None:
            reason, message = waiting or ("FederationInvalid", "")
            new_wait = status.client_waiting(_current_status(memo, body), reason, message,
                                             generation=generation, now=utcnow())
            written = await write_status(kube, memo, body, new_wait, kind="FederatedClient")
            if written is not None:
                kopf.warn(body, reason=reason, message=message)
            raise kopf.TemporaryError(message, delay=config.retry_delay)

        await ensure_credentials(kube, fed, fed_body["metadata"].get("uid", ""), [name], prune=False)
        manifest = children.silo_deployment(client, children.client_owner(client, uid), fed)
        try:
            outcome = await kube.apply(manifest)
        except ForeignObjectError as exc:
            kopf.warn(body, reason="NameConflict", message=str(exc))
            raise kopf.TemporaryError(str(exc), delay=config.retry_delay) from None
        if outcome != "unchanged":
            kopf.info(body, reason="Reconciled", message=f"Deployment {manifest['metadata']['name']} {outcome}")
        replicas = await _silo_replicas(kube, ns, name)
        new = status.client_deployed(
            _current_status(memo, body), generation=generation, selector=children.silo_selector(client, fed_name),
            replicas=replicas, now=utcnow())
        await write_status(kube, memo, body, new, kind="FederatedClient")


async def _silo_replicas(kube: Kube, namespace: str, client: str) -> int:
    dep = await kube.get("apps/v1", "Deployment", namespace, children.silo_name(client))
    return int(((dep or {}).get("status") or {}).get("replicas") or 0)


async def poll_client(
    *, kube: Kube, session: aiohttp.ClientSession, config: OperatorConfig, body: kopf.Body, memo: Any
) -> None:
    name, ns, _, generation = _identity(body)
    try:
        client = parse_client(body)
    except InvalidSpec:
        return
    fed_name = client.spec.federationRef.name
    fed_body = await kube.get(API_VERSION, "Federation", ns, fed_name)
    now = utcnow()
    new: BaseModel
    if fed_body is None:
        async with _status_lock(memo):
            new = status.client_waiting(
                _current_status(memo, body), status.FEDERATION_NOT_FOUND,
                f"Federation {fed_name!r} not found in namespace {ns!r}; waiting for it",
                generation=generation, now=now)
            await write_status(kube, memo, body, new, kind="FederatedClient")
        return
    try:
        fed = parse_federation(fed_body)
    except InvalidSpec:
        return
    replicas = await _silo_replicas(kube, ns, name)
    report, error, _ = await fetch_report(session, config, fed)
    async with _status_lock(memo):
        current = _current_status(memo, body)
        if report is not None:
            new = status.client_observed(current, report.silos.get(name), replicas=replicas, now=now)
        else:
            new = status.client_unreachable(current, error or "no answer", replicas=replicas, now=now)
        new = new.model_copy(update={"selector": children.silo_selector(client, fed_name)})
        written = await write_status(kube, memo, body, new, kind="FederatedClient")
    if written is not None:
        _post(body, status.client_events(*written))


async def delete_client(*, kube: Kube, body: kopf.Body, logger: logging.Logger | Any) -> None:
    """Revoke the silo's token; its Deployment goes with it through its ownerReference."""
    name, ns, _, _ = _identity(body)
    federation = ((body.get("spec") or {}).get("federationRef") or {}).get("name")
    if federation:
        await revoke_silo(kube, ns, str(federation), name)
        logger.info(f"revoked the token of silo {name!r} in federation {federation!r}")
