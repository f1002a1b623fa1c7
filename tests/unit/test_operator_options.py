"""How `federator operator`'s flags become kopf's run options (scope, standalone or peering)."""

from __future__ import annotations

import logging

from federator.cli import build_parser
from federator.operator.main import QuietChildWatches, operator_options


def test_no_namespace_is_clusterwide_and_standalone() -> None:
    assert operator_options(None, None, None) == {"clusterwide": True, "namespaces": [], "standalone": True}


def test_namespaces_scope_the_operator() -> None:
    opts = operator_options(["team-a", "team-b"], None, None)
    assert opts["clusterwide"] is False and opts["namespaces"] == ["team-a", "team-b"]


def test_peering_replicas_get_distinct_random_priorities_unless_one_is_given() -> None:
    drawn = {operator_options(None, "federator", None)["priority"] for _ in range(20)}
    assert len(drawn) > 1 and all(1 <= p <= 1_000_000 for p in drawn)  # two replicas of a Deployment do not tie
    opts = operator_options(None, "federator", 7)
    assert opts["standalone"] is False and opts["peering_name"] == "federator" and opts["priority"] == 7


def test_the_cli_flags_reach_the_options() -> None:
    args = build_parser().parse_args(["operator", "-n", "team-a", "--peering", "federator", "--priority", "3"])
    assert operator_options(args.namespace, args.peering, args.priority) == {
        "clusterwide": False, "namespaces": ["team-a"], "standalone": False, "peering_name": "federator",
        "priority": 3}


def test_the_log_leaves_out_the_watches_on_children_but_nothing_else() -> None:
    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, message, None, None)

    quiet = QuietChildWatches()
    assert not quiet.filter(record("Handler 'child-deployment' succeeded."))
    assert not quiet.filter(record("Handler 'child-secret' is invoked."))
    assert quiet.filter(record("Handler 'child-secret' failed with an exception. Will ignore."))
    assert quiet.filter(record("Handler 'federation' succeeded."))
