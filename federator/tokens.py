"""The server's tokens file: one format, written by the operator and read by the runtime.

JSON, so that a token may hold any character (commas, `=`, `#`, spaces) without a quoting rule of our own:

    {"workers": ["TOKEN", ...], "silos": {"SILO-NAME": "TOKEN", ...}}

A worker token lets a worker of simulated clients join; a silo token lets only that silo join (one silo's
token cannot be used to join as another). The client's own token file holds one token, as plain text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


class TokensError(ValueError):
    """A tokens file or variable that cannot be used; the message names where it came from and the fix."""


@dataclass(frozen=True)
class Tokens:
    workers: tuple[str, ...] = ()
    silos: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.workers or self.silos)

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> Tokens:
        """From in-memory entries `TOKEN` (a worker token) or `silo:NAME=TOKEN`: a shorthand for code and
        tests that build tokens in memory. Files and variables are always JSON (`loads`)."""
        workers, silos = [], {}
        for entry in entries:
            if entry.startswith("silo:") and "=" in entry:
                name, token = entry.removeprefix("silo:").split("=", 1)
                silos[name] = token
            elif entry:
                workers.append(entry)
        return cls(tuple(workers), silos)


def dumps(tokens: Tokens) -> str:
    """The file's text: workers in the order given, silos sorted by name (stable across reconciles)."""
    doc = {"workers": list(tokens.workers), "silos": {k: tokens.silos[k] for k in sorted(tokens.silos)}}
    return json.dumps(doc, indent=2) + "\n"


def loads(text: str, source: str = "tokens") -> Tokens:
    """Parse the file's text; raises TokensError naming `source` for anything but the documented shape."""
    expected = '{"workers": ["TOKEN", ...], "silos": {"NAME": "TOKEN"}}'
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise TokensError(f"{source}: not JSON ({exc}); expected {expected}") from None
    if not isinstance(doc, dict) or set(doc) - {"workers", "silos"}:
        raise TokensError(f"{source}: expected an object with only 'workers' and 'silos', like {expected}")
    workers = doc.get("workers", [])
    silos = doc.get("silos", {})
    if not isinstance(workers, list) or not all(isinstance(t, str) and t for t in workers):
        raise TokensError(f"{source}: 'workers' must be a list of non-empty strings")
    if not isinstance(silos, dict) or not all(isinstance(v, str) and v for v in silos.values()):
        raise TokensError(f"{source}: 'silos' must map each silo name to a non-empty string token")
    return Tokens(tuple(workers), dict(silos))


def read_server_tokens(path: str | None, env: str = "FEDERATOR_TOKENS") -> Tokens:
    """The accepted tokens, from `path` or else the environment variable `env` (both in this JSON format)."""
    if path:
        return loads(Path(path).read_text(), source=path)
    text = os.environ.get(env, "")
    return loads(text, source=env) if text.strip() else Tokens()


def read_client_token(path: str | None, env: str = "FEDERATOR_TOKEN") -> str:
    """This client's token: the whole file (or variable), without surrounding whitespace."""
    text = Path(path).read_text() if path else os.environ.get(env, "")
    return text.strip()

