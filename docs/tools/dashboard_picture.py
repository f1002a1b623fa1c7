"""Draw docs/monitoring-*.png from a real scrape: the quickstart federation runs on this machine, Debian's
Prometheus scrapes its server every second, and each panel of a chart dashboard is drawn from
Prometheus' range query of that panel's own PromQL.

    PYTHONPATH=. .venv/bin/python docs/tools/dashboard_picture.py training docs/monitoring-training.png
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from federator.api.manifest import load_federation
from federator.local import LocalRun
from tests.helpers.chart import CHART
from tests.helpers.prometheus import (
    Prometheus,
    federation_targets,
    free_port,
    grafana_to_promql,
    run_prometheus,
    start_scraped_workers,
)

ROOT = Path(__file__).resolve().parents[2]
RATE_WINDOW = "2s"  # Grafana's $__rate_interval at a 250 ms scrape interval is 1 s; a little smoother


def main(board_name: str, out: Path) -> None:
    board = json.loads((CHART / "dashboards" / f"{board_name}.json").read_text())
    manifest = ROOT / "examples" / "quickstart.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        run = LocalRun(manifest=manifest, fed=load_federation(manifest), out=Path(tmp) / "run", workers=2,
                       linger_seconds=-1)
        (run.out / "state").mkdir(parents=True)
        try:
            run.start_server()
            ports = [free_port() for _ in range(run.workers)]
            targets = federation_targets(run, ports, "quickstart", run.fed.metadata.namespace)
            with run_prometheus(Path(tmp) / "prom", targets, interval="250ms") as prom:
                prom.wait(lambda: prom.targets_up(f"127.0.0.1:{run.http_port}"), 120, "the first scrape")
                start = time.time()
                start_scraped_workers(run, ports)
                prom.wait(lambda: (run.status() or {}).get("phase") == "Succeeded", 600, "the federation")
                time.sleep(3)  # a few scrapes after the last round
                end = time.time()
                # from just before the workers joined (they take seconds to import torch and load data)
                joined = prom.api("query_range", query="federator_clients_connected > 0", start=f"{start:.3f}",
                                  end=f"{end:.3f}", step="0.25")["result"][0]["values"][0][0]
                draw(prom, board, max(start, float(joined) - 3), end, out)
        finally:
            run.stop()


def draw(prom: Prometheus, board: dict[str, Any], start: float, end: float, out: Path) -> None:
    panels = board["panels"]
    cols = 4 if len(panels) > 4 else len(panels)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            expr = grafana_to_promql(target["expr"], RATE_WINDOW)
            data = prom.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="0.25")
            for series in data["result"]:
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = target.get("legendFormat", "")
                for key, value in series["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                label = re.sub(r"\{\{\w+\}\}", "", label).strip()  # as Grafana shows a missing label
                ax.plot(xs, ys, label=label or None)
        ax.set_title(panel["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("seconds", fontsize=7)
        if any(t.get("legendFormat") for t in panel["targets"]):
            ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{board['title']} (quickstart, scraped every 250 ms by Prometheus)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
