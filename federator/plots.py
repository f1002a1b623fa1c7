"""Plots people would rather see than read: accuracy, loss and bytes on the wire per round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# fixed margins for the 6x4 in. round plots: tight_layout() would draw each figure once more to measure it
# (a third of the plotting time, which `federator run` spends after its last round)
MARGINS = {"left": 0.12, "right": 0.97, "bottom": 0.12, "top": 0.92}
LOG_MARGINS = {**MARGINS, "left": 0.16}  # log-scale tick labels (2 x 10^5) are wider


def plot_curves(rounds: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """Write accuracy.png and loss.png (value per round), and bytes.png when the rounds count bytes."""
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
        fig.subplots_adjust(**MARGINS)
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
    fig.subplots_adjust(**LOG_MARGINS)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_anomaly_scores(rounds: Sequence[dict[str, Any]], out: Path, title: str, max_clients: int = 20) -> Path | None:
    """anomaly.png: each client's detection score per round (flagged rounds marked with x) and the threshold;
    None when the run had no detection. The most often flagged clients are drawn first, at most `max_clients`."""
    scored = [r for r in rounds if r.get("byzantine")]
    if not scored:
        return None
    series: dict[str, list[tuple[int, float, bool]]] = {}
    for r in scored:
        for s in r["byzantine"]["scores"]:
            series.setdefault(s["client"], []).append((r["round"], s["score"], s["flagged"]))
    order = sorted(series, key=lambda c: (-sum(f for _, _, f in series[c]), c))[:max_clients]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for c in order:
        pts = series[c]
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1, label=c)[0]
        bad = [p for p in pts if p[2]]
        if bad:
            ax.scatter([p[0] for p in bad], [p[1] for p in bad], marker="x", s=50, color=line.get_color())
    ax.axhline(scored[-1]["byzantine"]["threshold"], color="black", ls="--", lw=1, label="threshold")
    ax.set_xlabel("round")
    ax.set_ylabel(f"anomaly score ({scored[-1]['byzantine']['method']})")
    ax.set_title(f"{title}: anomaly scores (x = flagged, left out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = out / "anomaly.png"
    fig.savefig(path)
    plt.close(fig)
    return path
