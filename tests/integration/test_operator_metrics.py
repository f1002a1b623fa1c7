"""`federator operator --metrics-port` against kmock: its /metrics counts what it does (a reconciled
Federation, an invalid spec, its API requests, the Federations by phase)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.operator_process import INVALID_SPEC, federation, operator_process, value

pytestmark = [pytest.mark.timeout(180)]

RECONCILES = "federator_operator_reconcile_total"


def test_the_operator_metrics_move_with_reconciles_and_invalid_specs(tmp_path: Path) -> None:
    with operator_process(tmp_path) as op:
        before = op.scrape()
        assert value(before, RECONCILES, kind="Federation", outcome="ok") == 0
        assert value(before, "federator_operator_federations", phase="Pending") == 0

        op.create(federation("demo"))
        op.wait(lambda: op.exists("/apis/apps/v1/namespaces/default/statefulsets/demo-server"), 60,
                "the Federation's server StatefulSet")
        after = op.scrape_until(lambda t: value(t, RECONCILES, kind="Federation", outcome="ok") >= 1
                                and value(t, "federator_operator_federations", phase="Pending") == 1,
                                "a counted reconcile pass and a managed Federation")
        assert value(after, RECONCILES, kind="Federation", outcome="invalid_spec") == 0
        assert value(after, "federator_operator_reconcile_duration_seconds_count", kind="Federation") >= 1
        # the children were applied through server-side apply (PATCH) and read first (GET), all answered
        assert value(after, "federator_operator_api_requests_total", verb="patch", outcome="ok") >= 7
        assert value(after, "federator_operator_api_requests_total", verb="get", outcome="not_found") >= 7

        op.create(federation("broken", **INVALID_SPEC))
        invalid = op.scrape_until(lambda t: value(t, RECONCILES, kind="Federation", outcome="invalid_spec") == 1,
                                  "the invalid spec counted")
        assert value(invalid, RECONCILES, kind="Federation", outcome="invalid_spec") == 1
        # both are managed; neither has a server that ran, so both are Pending (the CRD default phase)
        assert value(invalid, "federator_operator_federations", phase="Pending") == 2
        assert value(invalid, "federator_operator_api_requests_total", verb="create", outcome="ok") >= 1  # events
