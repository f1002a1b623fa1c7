"""Drift repair: a change to a child wakes its owner's resync, so a child deleted or edited by hand is
restored within moments instead of at the next periodic resync.

kopf watches every kind of child (labelled `app.kubernetes.io/managed-by: federator`); for each event,
`wanted()` decides from plain data whether the owner must look again, and `Nudges` wakes the owner's
resync daemon (registered under the owner's uid). Status-only changes (a Deployment's controller counting
its pods) do not wake anyone: the fingerprint leaves out status and the fields the API server maintains.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

from federator.api.models import API_VERSION

OWNER_KINDS = ("Federation", "FederatedClient")
# metadata the API server (not a person, not Federator) changes
SERVER_METADATA = ("resourceVersion", "generation", "managedFields", "uid", "creationTimestamp", "selfLink")


def fingerprint(obj: Mapping[str, Any]) -> str:
    """What a person or Federator may have changed in a child: everything but status and server metadata."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in SERVER_METADATA}
    content = {k: v for k, v in obj.items() if k not in ("status", "metadata")}
    return hashlib.sha256(json.dumps([meta, content], sort_keys=True, default=str).encode()).hexdigest()


def owner_uids(obj: Mapping[str, Any]) -> list[str]:
    """The uids of the Federation or FederatedClient that controls a child."""
    return [
        str(ref["uid"]) for ref in (obj.get("metadata") or {}).get("ownerReferences") or []
        if ref.get("controller") and ref.get("apiVersion") == API_VERSION and ref.get("kind") in OWNER_KINDS
        and ref.get("uid")
    ]


def wanted(event_type: str | None, last: str | None, current: str) -> bool:
    """Whether a watch event on a child asks its owner to reconcile.

    `event_type` is None for kopf's initial listing (the owner's resume handler reconciles anyway);
    `last` is the child's fingerprint when it was seen before (None: first seen).
    """
    if event_type == "DELETED":
        return True
    if event_type is None:
        return False
    return last != current


class Nudges:
    """Owner uid -> the event that wakes its resync daemon (operator-wide, shared by every handler)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    @contextlib.contextmanager
    def registered(self, uid: str) -> Iterator[asyncio.Event]:
        event = self._events[uid] = asyncio.Event()
        try:
            yield event
        finally:
            if self._events.get(uid) is event:
                del self._events[uid]

    def nudge(self, uid: str) -> bool:
        event = self._events.get(uid)
        if event is None:
            return False
        event.set()
        return True
