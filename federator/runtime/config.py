"""How runtime processes read their configuration: the Federation manifest (tokens: federator/tokens.py)."""

from __future__ import annotations

import os
from pathlib import Path

from federator.api.manifest import ManifestError, load_yaml_documents, parse_document
from federator.api.models import API_VERSION, Federation


def load_federation_config(path: str | Path) -> Federation:
    """A Federation from a manifest file, or from a file holding only its spec (then named by FEDERATOR_NAME)."""
    docs = load_yaml_documents(path)
    feds = [d for d in docs if isinstance(d, dict) and d.get("kind") == "Federation"]
    if feds:
        doc = feds[0]
    elif len(docs) == 1 and isinstance(docs[0], dict) and "rounds" in docs[0]:
        doc = {"apiVersion": API_VERSION, "kind": "Federation",
               "metadata": {"name": os.environ.get("FEDERATOR_NAME", "federation"),
                            "namespace": os.environ.get("FEDERATOR_NAMESPACE", "default")},
               "spec": docs[0]}
    else:
        raise ManifestError(str(path), ["(file): no Federation manifest or spec found"])
    fed = parse_document(doc).obj
    assert isinstance(fed, Federation)
    return fed

