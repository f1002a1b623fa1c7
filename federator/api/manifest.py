"""Reading manifests from files and turning validation errors into lines a person can act on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from federator.api.models import API_VERSION, FederatedClient, Federation

KINDS: dict[str, type[BaseModel]] = {"Federation": Federation, "FederatedClient": FederatedClient}


class ManifestError(ValueError):
    """A manifest that cannot be used; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


@dataclass(frozen=True)
class Document:
    index: int
    kind: str
    name: str
    obj: BaseModel


def _path_of(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "literal[", "tagged-union", "union[")) or "[" in str(part):
            continue  # pydantic's internal union/validator branch names are noise for a user
        else:
            out += ("." if out else "") + str(part)
    return out or "(document)"


def _allowed(err: ErrorDetails) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "literal_error":
        return f"allowed: {ctx.get('expected')}"
    if kind == "extra_forbidden":
        return "allowed: remove the field (unknown; check its spelling against `federator crds`)"
    if kind == "missing":
        return "allowed: add the field"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        ops = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
        bound = next(iter(ctx.values()), "?")
        return f"allowed: a number {ops[kind]} {bound}"
    if kind == "string_pattern_mismatch":
        return f"allowed: a string matching {ctx.get('pattern')}"
    if kind in ("too_long", "too_short"):
        return f"allowed: {err['msg'].lower()}"
    return ""  # type and parsing errors already say what is allowed ("Input should be a valid integer")


def format_validation_error(exc: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem: field path, the bad value and what is allowed."""
    lines = []
    for err in exc.errors():
        path = _path_of(tuple(err["loc"]))
        if prefix:
            path = f"{prefix}.{path}" if path != "(document)" else prefix
        value = err.get("input")
        shown = "missing" if err["type"] == "missing" else repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        allowed = _allowed(err)
        msg = err["msg"].removeprefix("Value error, ")
        line = f"{path}: {msg} (got {shown})"
        if allowed:
            line += f"; {allowed}"
        lines.append(line)
    return lines


def parse_document(data: Any, index: int = 0) -> Document:
    """Validate one decoded manifest document; raises ManifestError with every problem found."""
    source = f"document {index}"
    if not isinstance(data, dict):
        raise ManifestError(source, [f"(document): expected a mapping with apiVersion, kind, metadata, spec; "
                                     f"got {type(data).__name__}"])
    kind = data.get("kind")
    if data.get("apiVersion") != API_VERSION:
        raise ManifestError(source, [f"apiVersion: must be {API_VERSION!r} (got {data.get('apiVersion')!r})"])
    model = KINDS.get(str(kind))
    if model is None:
        raise ManifestError(source, [f"kind: unknown kind (got {kind!r}); allowed: {', '.join(KINDS)}"])
    try:
        obj = model.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(source, format_validation_error(exc)) from None
    return Document(index=index, kind=str(kind), name=obj.metadata.name, obj=obj)  # type: ignore[attr-defined]


def load_documents(path: str | Path) -> list[Document]:
    """Load and validate every document in a YAML file. Raises ManifestError listing every problem."""
    text = Path(path).read_text()
    try:
        raw = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(str(path), [f"(file): not valid YAML: {exc}"]) from None
    if not raw:
        raise ManifestError(str(path), ["(file): no documents found"])
    docs, problems = [], []
    for i, data in enumerate(raw):
        try:
            docs.append(parse_document(data, i))
        except ManifestError as exc:
            where = f"document {i}: " if len(raw) > 1 else ""
            problems += [where + p for p in exc.problems]
    if problems:
        raise ManifestError(str(path), problems)
    return docs


def load_federation(path: str | Path) -> Federation:
    """The single Federation in a manifest file (FederatedClient documents beside it are allowed)."""
    feds = [d.obj for d in load_documents(path) if isinstance(d.obj, Federation)]
    if len(feds) != 1:
        raise ManifestError(str(path), [f"(file): expected exactly one Federation, found {len(feds)}"])
    return feds[0]
