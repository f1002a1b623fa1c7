"""The `federator` command. Each subcommand lives in its own module; this file only parses arguments."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from federator import __version__

# subcommand -> module whose `main(args) -> int` runs it (imported lazily: `validate` must not load torch)
COMMANDS = {
    "run": "federator.local",
    "validate": "federator.api.validate",
    "server": "federator.runtime.server",
    "client": "federator.runtime.client",
    "crds": "federator.api.crd",
    "operator": "federator.operator.main",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="federator", description="Federated learning on Kubernetes and on your laptop."
    )
    parser.add_argument("--version", action="version", version=f"federator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a Federation manifest on this machine (no cluster needed)")
    run.add_argument("manifest", help="YAML file with one Federation")
    run.add_argument("--out", default=None, help="results folder (default: results/<name>)")
    run.add_argument("--workers", type=int, default=None,
                     help="client worker processes (default: spec.clients.workers)")
    run.add_argument("--resume", action="store_true",
                     help="resume from the checkpoint in --out instead of starting over")
    run.add_argument("--quiet", action="store_true", help="no progress bar; one line per round")

    val = sub.add_parser("validate", help="check manifests offline; exit 2 and one line per problem if invalid")
    val.add_argument("files", nargs="+", help="YAML files")

    srv = sub.add_parser("server", help="run the federation server (what the server pod runs)")
    srv.add_argument("--config", required=True, help="Federation manifest or its spec as YAML/JSON")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=None, help="gRPC port (default: spec.server.port; 0 = any free)")
    srv.add_argument("--metrics-port", type=int, default=None, help="HTTP port (default: spec.server.metricsPort)")
    srv.add_argument("--state-dir", default="./federator-state", help="checkpoint, final model and logs")
    srv.add_argument("--token-file", default=None,
                     help='accepted tokens as JSON: {"workers": [...], "silos": {NAME: TOKEN}} (or FEDERATOR_TOKENS)')
    srv.add_argument("--ready-file", default=None, help="write 'grpc_port metrics_port' here once listening")
    srv.add_argument("--linger-seconds", type=float, default=0.0,
                     help="after the last round keep serving until the workers left, at most this long; "
                          "-1: until stopped (in a cluster)")
    srv.add_argument("--tls-cert", default=None, help="PEM server certificate (with --tls-key): gRPC over TLS")
    srv.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")

    cli = sub.add_parser("client", help="run a client worker, or a silo client with --silo")
    cli.add_argument("--server", required=True, help="server address host:port")
    cli.add_argument("--config", required=True, help="Federation manifest or its spec as YAML/JSON")
    cli.add_argument("--token-file", default=None, help="file with this client's token (or FEDERATOR_TOKEN)")
    cli.add_argument("--name", default=None, help="worker name in logs (default: hostname-pid)")
    cli.add_argument("--silo", default=None, help="serve only this silo's own data, under this name")
    cli.add_argument("--data", default=None, help="silo: data file or folder")
    cli.add_argument("--format", default="npz", choices=["npz", "csv", "imagefolder"], help="silo: data format")
    cli.add_argument("--metrics-port", type=int, default=0, help="HTTP /metrics port (0 = any free, -1 = off)")
    cli.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    cli.add_argument("--tls-ca", default=None, help="PEM CA certificate: connect over TLS and verify the server")
    cli.add_argument("--tls-server-name", default=None, help="name to verify in the server's certificate")

    crds = sub.add_parser("crds", help="print or write the CustomResourceDefinitions generated from the API models")
    crds.add_argument("--out", default=None, help="folder to write one YAML file per CRD (default: stdout)")

    op = sub.add_parser("operator", help="run the Kubernetes operator")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=None, help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    op.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="liveness endpoint URL")
    op.add_argument("--metrics-port", type=int, default=8080,
                    help="HTTP /metrics port of the operator's own metrics (-1 = off)")
    op.add_argument("--peering", default=None, help="kopf peering name for more than one replica (default: standalone)")
    op.add_argument("--priority", type=int, default=None,
                    help="peering priority: the highest live one works (default: random, so replicas never tie)")
    op.add_argument("--verbose", action="store_true")
    return parser


# the runtime's processes: everything durable is on disk (atomically) when their main returns; `run` has
# written its results and stopped its children by then (and holds torch too, when it forked them)
EXIT_AT_ONCE = ("run", "server", "client")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command])
    code: int = module.main(args)
    if args.command in EXIT_AT_ONCE:
        exit_at_once(code)
    return code


def exit_at_once(code: int) -> None:
    """Flush and leave without Python's interpreter teardown, which for a process holding torch and gRPC
    takes seconds on a busy machine (2.8 s against 0.07 s measured on 2 cores at load 8), and every
    `federator run` would wait for it twice (server, then workers), then for its own."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
