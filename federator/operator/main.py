"""`federator operator`: run the kopf operator (all namespaces or a list, liveness and metrics endpoints,
peering)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
from typing import Any

import kopf

import federator.operator.handlers  # noqa: F401  (registers the handlers with kopf's default registry)
from federator.operator import metrics
from federator.operator.reconcile import OperatorConfig


def operator_options(namespaces: list[str] | None, peering: str | None, priority: int | None) -> dict[str, Any]:
    """The arguments of `kopf.run` / `kopf.operator` for a scope and a peering choice.

    One replica runs standalone. More replicas share a kopf peering object (its CRD, `ClusterKopfPeering`
    or `KopfPeering` for a namespaced operator, must be installed): only the live replica with the
    highest priority handles objects, the others wait and take over when its keep-alive expires. kopf
    pauses *every* replica when the top priority is shared, so a replica without `--priority` draws a
    random one: replicas of one Deployment then never tie.
    """
    scoped = list(namespaces or [])
    options: dict[str, Any] = {"clusterwide": not scoped, "namespaces": scoped, "standalone": peering is None}
    if peering is not None:
        options["peering_name"] = peering
        options["priority"] = priority if priority is not None else random.SystemRandom().randint(1, 1_000_000)
    return options


class QuietChildWatches(logging.Filter):
    """Drop kopf's per-event lines for the watches on children (every Deployment status change has one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Handler 'child-") and message.endswith(("is invoked.", "succeeded.")))


def main(args: argparse.Namespace) -> int:
    kopf.configure(verbose=bool(args.verbose), log_prefix=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(QuietChildWatches())
    options = operator_options(args.namespace, args.peering, args.priority)
    if not options["standalone"]:
        logging.getLogger(__name__).info("peering %r with priority %d", args.peering, options["priority"])
    metrics.serve(args.metrics_port)
    try:
        kopf.run(liveness_endpoint=args.liveness or None, memo=kopf.Memo(config=OperatorConfig.from_env()),
                 **options)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    return 0
