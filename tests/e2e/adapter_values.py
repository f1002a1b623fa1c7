"""prometheus-adapter values with the chart's own rule: `python -m tests.e2e.adapter_values > values.yaml`."""

from __future__ import annotations

import sys

import yaml

from tests.helpers.chart import one, render


def adapter_values() -> dict[str, object]:
    cm = one(render({"monitoring": {"prometheusAdapter": {"enabled": True}}}), "ConfigMap")
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    return {"rules": {"default": False, "custom": rules}}


if __name__ == "__main__":
    sys.stdout.write(yaml.safe_dump(adapter_values(), sort_keys=False))
