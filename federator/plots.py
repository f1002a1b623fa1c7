"""Plots people would rather see than read: accuracy and loss per round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_curves(rounds: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """Write accuracy.png and loss.png (value per round, wall time on a second axis label)."""
    written = []
    xs = [r["round"] for r in rounds]
    for key, label in (("accuracy", "test accuracy"), ("loss", "test loss")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(xs, [r[key] for r in rounds], marker="o", color="tab:blue" if key == "accuracy" else "tab:red")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_title(f"{title}: {label}")
        ax.grid(alpha=0.3)
        if key == "accuracy":
            ax.set_ylim(0, 1.0)
        fig.tight_layout()
        path = out / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
