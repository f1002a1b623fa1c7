"""`module:factory` models that are wrong in the ways a user's can be (for the preflight checks)."""

from __future__ import annotations

from typing import Any


def wrong_signature(layers: int) -> Any:
    return None


def not_a_module(input_shape: tuple[int, ...], num_classes: int) -> dict[str, int]:
    return {"classes": num_classes}


def raises(input_shape: tuple[int, ...], num_classes: int) -> Any:
    raise RuntimeError("CUDA is not available")
