"""The pure buffer check (federator.api.buffer) agrees with the runtime it describes."""

from __future__ import annotations

import pytest

from federator.api.buffer import STREAMING_RULES
from federator.api.models import DataSpec
from federator.preflight import built_in_shape
from federator.runtime.aggregation import RULES
from federator.runtime.data import load_dataset


def test_streaming_rules_are_the_registrys() -> None:
    assert set(STREAMING_RULES) == {name for name, rule in RULES.items() if rule.streaming}


@pytest.mark.parametrize("data", [
    {"dataset": "digits"},
    {"dataset": "synthetic", "synthetic": {"samples": 20, "features": 7, "classes": 3}},
])
def test_built_in_shapes_are_what_the_loader_gives(data: dict[str, object]) -> None:
    spec = DataSpec.model_validate(data)
    ds = load_dataset(spec)
    assert built_in_shape(spec) == (ds.input_shape, ds.num_classes)
