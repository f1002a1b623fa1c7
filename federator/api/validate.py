"""`federator validate FILE...`: offline validation of manifests."""

from __future__ import annotations

import argparse
import sys

from federator.api.manifest import ManifestError, load_documents


def main(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            docs = load_documents(path)
        except FileNotFoundError:
            print(f"{path}: file not found", file=sys.stderr)
            failed = True
            continue
        except ManifestError as exc:
            failed = True
            for problem in exc.problems:
                print(f"{path}: {problem}", file=sys.stderr)
            continue
        for doc in docs:
            print(f"{path}: {doc.kind}/{doc.name} is valid")
    return 2 if failed else 0
