"""`federator operator`: run the kopf operator (all namespaces or a list, liveness endpoint, peering)."""

from __future__ import annotations

import argparse
import asyncio
import logging

import kopf

import federator.operator.handlers  # noqa: F401  (registers the handlers with kopf's default registry)
from federator.operator.reconcile import OperatorConfig


def main(args: argparse.Namespace) -> int:
    kopf.configure(verbose=bool(args.verbose), log_prefix=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    namespaces = list(args.namespace or [])
    try:
        kopf.run(
            clusterwide=not namespaces,
            namespaces=namespaces,
            # One replica runs standalone; more replicas need kopf's peering CRD and a peering name,
            # and then only the replica with the highest priority handles objects (leader election).
            standalone=args.peering is None,
            peering_name=args.peering,
            liveness_endpoint=args.liveness or None,
            memo=kopf.Memo(config=OperatorConfig.from_env()),
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    return 0
