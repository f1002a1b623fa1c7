"""Plots people would rather see than read: accuracy, loss and bytes on the wire per round."""

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
    if rounds and "bytes_sent" in rounds[0]:
        written.append(plot_bytes(rounds, out / "bytes.png", title))
    return written


def plot_bytes(rounds: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Bytes sent to and received from the workers per round (gRPC message sizes), log scale, with the
    run's compression ratio per direction in the legend when the rounds carry it."""
    xs = [r["round"] for r in rounds]
    ratio = rounds[-1].get("compression_ratio") or {}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, direction, label, color in (("bytes_sent", "downlink", "sent (global model)", "tab:blue"),
                                         ("bytes_received", "uplink", "received (updates)", "tab:orange")):
        if direction in ratio:
            label += f", {ratio[direction]:.3g}x compressed"
        ax.plot(xs, [max(1, r.get(key, 0)) for r in rounds], marker="o", color=color, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("bytes per round")
    ax.set_title(f"{title}: bytes on the wire")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
