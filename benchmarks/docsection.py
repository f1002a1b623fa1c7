"""What the benchmark scripts share: their marked section of docs/benchmarks.md, and the machine."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names (`make bench` runs them all).\n\n"


def write_section(section: str, begin: str, end: str, doc: Path = DOC) -> None:
    """Replace the text between `begin` and `end` (both included in `section`), or append it."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    elif text:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = HEADER + section
    doc.write_text(text)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
