#!/usr/bin/env bash
# A kind cluster for tests/e2e: Federator's images loaded, kube-prometheus-stack (Prometheus Operator,
# Prometheus, kube-state-metrics, Grafana) and prometheus-adapter with the chart's rule. Needs docker (or
# podman: DOCKER=podman), kind, helm and kubectl on PATH, and the internet. See docs/e2e.md.
#   bash tests/e2e/kind-up.sh && FEDERATOR_E2E_KUBECONFIG=$PWD/.e2e/kubeconfig make e2e
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-federator-e2e}
PY=${PY:-.venv/bin/python}
mkdir -p .e2e
export KUBECONFIG=$PWD/.e2e/kubeconfig

kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" --wait 120s
make images
VERSION=$(sed -n 's/^appVersion: *"\(.*\)"/\1/p' charts/federator/Chart.yaml)
kind load docker-image --name "$CLUSTER" "ghcr.io/federator/operator:$VERSION" "ghcr.io/federator/runtime:$VERSION"

helm repo add prometheus-community https://prometheus-community.github.io/helm-charts >/dev/null
helm repo update >/dev/null
# every ServiceMonitor/PrometheusRule in the cluster, whatever its labels
helm upgrade --install kps prometheus-community/kube-prometheus-stack -n monitoring --create-namespace --wait \
  --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false \
  --set prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues=false \
  --set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false \
  --set prometheus.prometheusSpec.scrapeInterval=15s \
  --set alertmanager.enabled=false
# the adapter serves federator_pending_tasks with the rule the chart ships (rendered by Helm's engine)
PYTHONPATH=$PWD "$PY" -m tests.e2e.adapter_values > .e2e/adapter-values.yaml
helm upgrade --install prometheus-adapter prometheus-community/prometheus-adapter -n monitoring --wait \
  --set prometheus.url=http://kps-kube-prometheus-stack-prometheus.monitoring.svc --set prometheus.port=9090 \
  -f .e2e/adapter-values.yaml
echo "ready: FEDERATOR_E2E_KUBECONFIG=$KUBECONFIG make e2e"
