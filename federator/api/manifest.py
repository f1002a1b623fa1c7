"""Reading manifests from files and turning validation errors into lines a person can act on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from federator.api.models import (
    API_VERSION,
    BUILTIN_MODELS,
    DNS_LABEL_PATTERN,
    MODEL_NAME_PATTERN,
    FederatedClient,
    Federation,
)

KINDS: dict[str, type[BaseModel]] = {"Federation": Federation, "FederatedClient": FederatedClient}
PATTERNS_IN_WORDS = {
    MODEL_NAME_PATTERN: f"a built-in model ({', '.join(BUILTIN_MODELS)}) or module:factory of your own "
                        "(e.g. mypackage.models:build)",
    DNS_LABEL_PATTERN: "lower-case letters, digits and '-', starting and ending with a letter or digit",
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML 1.2 says so;
    PyYAML keeps the last value silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {first} and {line}): keep one", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


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
        pattern = str(ctx.get("pattern"))
        return f"allowed: {PATTERNS_IN_WORDS.get(pattern, f'a string matching {pattern}')}"
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
        if err["type"] == "string_pattern_mismatch" and str((err.get("ctx") or {}).get("pattern")) in PATTERNS_IN_WORDS:
            msg = "not an allowed value"  # the words below say what is, better than the regular expression
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
        obj = model.model_validate(data, strict=True)  # as the CRD's OpenAPI types: "3" is not an integer
    except ValidationError as exc:
        raise ManifestError(source, format_validation_error(exc)) from None
    return Document(index=index, kind=str(kind), name=obj.metadata.name, obj=obj)  # type: ignore[attr-defined]


def load_documents(path: str | Path) -> list[Document]:
    """Load and validate every document in a YAML file. Raises ManifestError listing every problem."""
    raw = load_yaml_documents(path)
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


def load_yaml_documents(path: str | Path) -> list[Any]:
    """The file's non-empty YAML documents; ManifestError for a file that is not UTF-8 or not YAML, or that
    gives a key twice."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(str(path), [f"(file): not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                                        "save the file as UTF-8"]) from None
    try:
        return [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d is not None]  # a SafeLoader
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ManifestError(str(path), [f"(file): not valid YAML: {detail}"]) from None


def load_federation(path: str | Path) -> Federation:
    """The single Federation in a manifest file (FederatedClient documents beside it are allowed)."""
    feds = [d.obj for d in load_documents(path) if isinstance(d.obj, Federation)]
    if len(feds) != 1:
        raise ManifestError(str(path), [f"(file): expected exactly one Federation, found {len(feds)}"])
    return feds[0]
