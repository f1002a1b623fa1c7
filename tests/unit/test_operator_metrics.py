"""The outcome labels of the operator's metrics (federator/operator/metrics.py), and its port option."""

from __future__ import annotations

import asyncio
import socket

import kopf
import pytest

from federator.cli import build_parser
from federator.operator import metrics
from federator.operator.metrics import (
    InvalidSpecError,
    RefusedChangeError,
    api_outcome,
    observed_reconcile,
    reconcile_outcome,
)


@pytest.mark.parametrize(("exc", "refused", "outcome"), [
    (None, False, "ok"),
    (None, True, "immutable_field"),
    (RefusedChangeError("refused: spec.checkpoint.size"), False, "immutable_field"),
    (InvalidSpecError("invalid spec: spec.clients"), False, "invalid_spec"),
    (kopf.TemporaryError("waiting", delay=1), False, "temporary_error"),
    (kopf.PermanentError("something else"), False, "error"),
    (RuntimeError("boom"), False, "error"),
])
def test_a_pass_is_labelled_by_what_it_raised(exc: BaseException | None, refused: bool, outcome: str) -> None:
    assert reconcile_outcome(exc, refused) == outcome


def test_the_permanent_errors_are_still_kopfs() -> None:  # kopf must not retry them
    assert issubclass(InvalidSpecError, kopf.PermanentError) and issubclass(RefusedChangeError, kopf.PermanentError)


@pytest.mark.parametrize(("status", "outcome"), [
    (200, "ok"), (201, "ok"), (404, "not_found"), (409, "conflict"), (422, "invalid"), (403, "client_error"),
    (500, "server_error"), (None, "unreachable"),
])
def test_an_api_request_is_labelled_by_its_answer(status: int | None, outcome: str) -> None:
    assert api_outcome(status) == outcome


def test_an_observed_pass_counts_its_outcome_and_duration() -> None:
    def count(outcome: str) -> float:
        return metrics.RECONCILES.labels("Test", outcome)._value.get()

    durations = metrics.RECONCILE_SECONDS.labels("Test")
    before = durations._sum.get()

    async def passes() -> None:
        async with observed_reconcile("Test"):
            pass
        async with observed_reconcile("Test") as this:
            this.refused = True
        with pytest.raises(InvalidSpecError):
            async with observed_reconcile("Test"):
                raise InvalidSpecError("invalid spec: x")

    asyncio.run(passes())
    assert (count("ok"), count("immutable_field"), count("invalid_spec")) == (1, 1, 1)
    assert durations._sum.get() > before


def test_the_phase_gauge_counts_each_federation_once() -> None:
    phases = metrics.FederationPhases()
    phases.set("a", "Running")
    phases.set("a", "Succeeded")
    phases.set("b", None)
    phases.forget("c")
    [family] = phases.collect()
    assert {s.labels["phase"]: s.value for s in family.samples} == {"Succeeded": 1, "Pending": 1}


def test_the_metrics_port_defaults_to_8080_and_a_busy_one_is_a_clear_error() -> None:
    assert build_parser().parse_args(["operator"]).metrics_port == 8080
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port {port}.*--metrics-port"):
            metrics.serve(port, addr="127.0.0.1")
