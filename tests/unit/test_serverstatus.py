"""The `/status` model keeps what a newer server adds, and refuses what the operator cannot read."""

from __future__ import annotations

import pytest

from federator.api.serverstatus import ServerStatus
from federator.operator import status


def test_fields_other_engineers_add_are_kept_through_the_model() -> None:
    sent = {"phase": "Running", "round": 2, "warnings": ["accuracy has not moved"],
            "byzantine": {"flagged": ["c3"], "scores": {"c3": 4.2}},
            "silos": {"a": {"joined": True, "reputation": 0.9}}}
    payload = ServerStatus.model_validate(sent).payload()
    assert payload["warnings"] == ["accuracy has not moved"]
    assert payload["byzantine"] == {"flagged": ["c3"], "scores": {"c3": 4.2}}
    assert payload["silos"]["a"] == {"joined": True, "roundsParticipated": 0, "lastUpdateTime": None,
                                     "flagged": False, "reputation": 0.9}
    assert ServerStatus.model_validate(payload).payload() == payload  # what the operator reads is what was sent


def test_every_declared_field_is_written_even_when_unset() -> None:
    payload = ServerStatus(phase="Pending", round=0).payload()
    assert set(payload) == set(ServerStatus.model_fields)
    assert payload["clients"] == {"connected": 0, "participants": 0}


@pytest.mark.parametrize("bad", [
    {"phase": "Exploding", "round": 1},
    {"phase": "Running", "round": -1},
    {"phase": "Running"},
    {"phase": "Running", "round": 1, "clients": {"connected": "many"}},
])
def test_what_the_operator_cannot_read_is_a_bad_report(bad: dict[str, object]) -> None:
    with pytest.raises(status.BadReport):
        status.parse_report(bad)
    with pytest.raises(ValueError):
        ServerStatus.model_validate(bad)  # and the server cannot write it either
