"""kopf registrations only: each handler hands its arguments to `reconcile.py` and returns None.

(A handler's return value would land in `status.<handler id>`; Federator owns its status fields.)
Run it with `federator operator` or `kopf run -m federator.operator.handlers`, never by file path.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import kopf

from federator.api.models import GROUP, VERSION
from federator.operator import daemon, drift, reconcile
from federator.operator.kube import MANAGED_BY, MANAGED_BY_LABEL, PLURALS, Kube
from federator.operator.metrics import PHASES, observed_reconcile

FEDERATIONS = (GROUP, VERSION, "federations")
CLIENTS = (GROUP, VERSION, "federatedclients")
FINALIZER = "federator.dev/finalizer"
# every kind of child the operator creates (kopf watches those that the cluster serves)
CHILD_KINDS = ("ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "HorizontalPodAutoscaler",
               "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor")


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="federator.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="federator.dev", key="last-handled-configuration")
    # A watch that silently stalls (lost connection through a proxy or load balancer) never recovers by
    # itself: bound it on both ends so it is re-established.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.posting.reporting_component = "federator-operator"
    settings.posting.level = logging.INFO
    if "config" not in memo:
        memo["config"] = reconcile.OperatorConfig.from_env()
    if "kube" not in memo:
        memo["kube"] = Kube.from_environment()
    if "http" not in memo:
        memo["http"] = aiohttp.ClientSession()
    # kopf gives each object a shallow copy of this memo: shared objects are how cleanup reaches the
    # daemons and how a changed child wakes its owner's resync
    memo["lifecycle"] = {"closing": False}
    memo["nudges"] = drift.Nudges()
    memo["apis"] = {}


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    memo["lifecycle"]["closing"] = True
    await memo["kube"].close()
    await memo["http"].close()


@kopf.on.probe(id="api")
async def api_reachable(memo: kopf.Memo, **_: Any) -> None:
    await memo["kube"].ping()


# ---------------------------------------------------------------------------------------- Federation


@kopf.on.resume(*FEDERATIONS)
@kopf.on.create(*FEDERATIONS)
@kopf.on.update(*FEDERATIONS)
async def federation(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    async with observed_reconcile("Federation") as this:
        this.refused = await reconcile.reconcile_federation(
            kube=memo["kube"], config=memo["config"], body=body, memo=memo, logger=logger)


@kopf.daemon(*FEDERATIONS, id="status", cancellation_backoff=2.0, cancellation_timeout=5.0)
async def federation_status(
    body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
) -> None:
    async def poll() -> None:
        await reconcile.poll_federation(
            kube=memo["kube"], session=memo["http"], config=memo["config"], body=body, memo=memo)

    try:
        await daemon.daemon_loop(poll, stopped=stopped, interval=memo["config"].status_interval, logger=logger,
                                  closing=lambda: bool(memo["lifecycle"]["closing"]))
    finally:  # deleted, or no longer this replica's: no longer counted among the managed Federations
        PHASES.forget(str(body["metadata"].get("uid")))


@kopf.daemon(*FEDERATIONS, id="resync", cancellation_backoff=2.0, cancellation_timeout=5.0)
async def federation_resync(
    body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
) -> None:
    async def resync() -> None:
        async with observed_reconcile("Federation") as this:
            this.refused = await reconcile.reconcile_federation(
                kube=memo["kube"], config=memo["config"], body=body, memo=memo, logger=logger, resync=True)

    await _resync_loop(resync, body=body, memo=memo, stopped=stopped, logger=logger)


async def _resync_loop(resync: daemon.Step, *, body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                       logger: kopf.Logger) -> None:
    config = memo["config"]
    with memo["nudges"].registered(body["metadata"]["uid"]) as wake:
        await daemon.daemon_loop(resync, stopped=stopped, interval=config.resync_interval, logger=logger,
                                 what="resync", wake=wake, wait_first=True, retry_after=config.retry_delay,
                                 closing=lambda: bool(memo["lifecycle"]["closing"]))


# ----------------------------------------------------------------------------------- FederatedClient


@kopf.on.resume(*CLIENTS)
@kopf.on.create(*CLIENTS)
@kopf.on.update(*CLIENTS)
async def federated_client(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    async with observed_reconcile("FederatedClient"):
        await reconcile.reconcile_client(
            kube=memo["kube"], config=memo["config"], body=body, memo=memo, logger=logger)


@kopf.on.delete(*CLIENTS)
async def federated_client_deleted(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    await reconcile.delete_client(kube=memo["kube"], body=body, logger=logger)


@kopf.daemon(*CLIENTS, id="resync", cancellation_backoff=2.0, cancellation_timeout=5.0)
async def federated_client_resync(
    body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
) -> None:
    async def resync() -> None:
        async with observed_reconcile("FederatedClient"):
            await reconcile.reconcile_client(
                kube=memo["kube"], config=memo["config"], body=body, memo=memo, logger=logger, resync=True)

    await _resync_loop(resync, body=body, memo=memo, stopped=stopped, logger=logger)


@kopf.daemon(*CLIENTS, id="status", cancellation_backoff=2.0, cancellation_timeout=5.0)
async def federated_client_status(
    body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
) -> None:
    async def poll() -> None:
        await reconcile.poll_client(
            kube=memo["kube"], session=memo["http"], config=memo["config"], body=body, memo=memo)

    await daemon.daemon_loop(poll, stopped=stopped, interval=memo["config"].status_interval, logger=logger,
                              closing=lambda: bool(memo["lifecycle"]["closing"]))


# ------------------------------------------------------------------------------------------ children


async def child_changed(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    reconcile.child_changed(memo, body, type)


for (_api_version, _kind), _plural in PLURALS.items():
    if _kind in CHILD_KINDS:
        kopf.on.event(_api_version, _plural, id=f"child-{_kind.lower()}",
                      labels={MANAGED_BY_LABEL: MANAGED_BY})(child_changed)
