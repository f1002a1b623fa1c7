"""`federator validate FILE...`: offline validation of manifests.

Beyond the schema, a Federation is checked against this machine as far as that can be done offline
(federator/preflight.py: its data file opens, its model builds); FederatedClients' data lives on their
own volumes and is not checked here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from federator.api.manifest import ManifestError, load_documents
from federator.api.models import Federation


def main(args: argparse.Namespace) -> int:
    from federator.preflight import check_federation

    failed = False
    for path in args.files:
        try:
            docs = load_documents(path)
        except FileNotFoundError:
            print(f"{path}: file not found", file=sys.stderr)
            failed = True
            continue
        except OSError as exc:
            print(f"{path}: cannot read the file: {exc.strerror or exc}", file=sys.stderr)
            failed = True
            continue
        except ManifestError as exc:
            failed = True
            for problem in exc.problems:
                print(f"{path}: {problem}", file=sys.stderr)
            continue
        for doc in docs:
            problems = check_federation(doc.obj, Path.cwd()) if isinstance(doc.obj, Federation) else []
            for problem in problems:
                print(f"{path}: {doc.kind}/{doc.name}: {problem}", file=sys.stderr)
            failed = failed or bool(problems)
            if not problems:
                print(f"{path}: {doc.kind}/{doc.name} is valid")
    return 2 if failed else 0
