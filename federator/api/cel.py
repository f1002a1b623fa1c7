"""Cross-field rules declared once: a model validator carries its CEL twin, and the CRD is generated from it.

A pydantic `model_validator` checks a rule for `federator validate`, the runtime and the operator; the
CRD needs the same rule in CEL (`x-kubernetes-validations`) so that `kubectl apply` refuses it too.
Write the CEL next to the validator, under `@model_validator`:

    @model_validator(mode="after")
    @cel("self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas", field_path=".minReplicas")
    def _min_le_max(self) -> AutoscalingSpec:
        ...

`federator crds` places each rule on the schema of the model that declares it (`self` is that object, as
in the validator). `tests/unit/test_crd.py` fails for a validator without a CEL twin (mark one that CEL
cannot express with `@cel_none("why")`) and for a rule without a bad example run through both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

F = TypeVar("F", bound=Callable[..., Any])
RULES_ATTR = "__federator_cel__"
NONE_ATTR = "__federator_cel_none__"


@dataclass(frozen=True)
class CelRule:
    """One `x-kubernetes-validations` entry."""

    rule: str
    message: str
    field_path: str | None = None

    def validation(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path is not None:
            out["fieldPath"] = self.field_path
        return out


def cel(rule: str, message: str, *, field_path: str | None = None) -> Callable[[F], F]:
    """Declare the CEL rule that restates the validator below it (stack several for several rules)."""
    def mark(fn: F) -> F:
        setattr(fn, RULES_ATTR, [CelRule(rule, message, field_path), *getattr(fn, RULES_ATTR, [])])
        return fn
    return mark


def cel_none(why: str) -> Callable[[F], F]:
    """A validator that CEL cannot restate (the operator reports it as InvalidSpec instead): say why."""
    def mark(fn: F) -> F:
        setattr(fn, NONE_ATTR, why)
        return fn
    return mark


def _validators(model: type[BaseModel]) -> list[Callable[..., Any]]:
    return [dec.func for dec in model.__pydantic_decorators__.model_validators.values()]


def rules_of(model: type[BaseModel]) -> list[CelRule]:
    """The CEL rules declared on a model's validators, in declaration order."""
    return [rule for fn in _validators(model) for rule in getattr(fn, RULES_ATTR, [])]


def undeclared(model: type[BaseModel]) -> list[str]:
    """The model's validators with neither a CEL twin nor a reason why there is none."""
    return [fn.__name__ for fn in _validators(model) if not getattr(fn, RULES_ATTR, None)
            and getattr(fn, NONE_ATTR, None) is None]
