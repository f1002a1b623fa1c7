"""Early warnings about a federation that trains but does not learn."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STUCK_ROUNDS = 3  # rounds at the majority-class rate before the warning
STUCK_TOLERANCE = 0.01


def majority_rate(labels: np.ndarray, num_classes: int) -> float:
    """The accuracy of always predicting the most frequent class of ``labels``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=max(1, num_classes))
    return float(counts.max() / counts.sum()) if counts.sum() else 0.0


def stuck_at_majority(accuracies: Sequence[float], majority: float, rounds: int = STUCK_ROUNDS,
                      tolerance: float = STUCK_TOLERANCE) -> bool:
    """True when each of the last ``rounds`` accuracies is within ``tolerance`` of the majority-class rate."""
    recent = list(accuracies)[-rounds:]
    return len(recent) >= rounds and all(abs(a - majority) <= tolerance for a in recent)


def stuck_message(rounds: int, majority: float, normalize: str) -> str:
    hint = "" if normalize == "standard" else f"scale the features (data.normalize: standard, now {normalize}) or "
    return (
        f"accuracy has stayed at the majority-class rate ({majority:.3f}) for {rounds} rounds: the model "
        f"predicts one class; {hint}change training.learningRate"
    )
