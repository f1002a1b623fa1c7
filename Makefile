PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install --quiet --constraint constraints.txt

.PHONY: demo test lint unit install protos crds bench images e2e-cluster e2e clean

## Install into .venv (once per change of pyproject.toml).
install: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(STAMP)

## Run the quickstart federation on this machine; results land in results/quickstart.
demo: $(STAMP)
	$(BIN)/federator run examples/quickstart.yaml --out results/quickstart

## Lint, type-check and run the whole test suite.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m mypy

## Regenerate the gRPC code and the CRDs (both are committed; tests fail on drift).
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. \
	  --python_out=. --grpc_python_out=. --pyi_out=. federator/runtime/proto/federator.proto
crds: $(STAMP)
	$(BIN)/federator crds --out crds
	$(BIN)/federator crds --out charts/federator/crds

## Benchmarks against peers (Flower); writes docs/benchmarks.md.
bench: $(STAMP)
	bash benchmarks/run.sh

## Container images, tagged as the chart uses them by default (needs docker or podman: DOCKER=podman).
## GPUs: TORCH_INDEX=<a CUDA wheel index> and optionally RUNTIME_BASE=<a CUDA image with Python 3.11>.
VERSION  ?= $(shell sed -n 's/^appVersion: *"\(.*\)"/\1/p' charts/federator/Chart.yaml)
REGISTRY ?= ghcr.io/federator
DOCKER   ?= docker
images:
	$(DOCKER) build -f operator/Dockerfile -t $(REGISTRY)/operator:$(VERSION) .
	$(DOCKER) build -f runtime/Dockerfile -t $(REGISTRY)/runtime:$(VERSION) \
	  $(if $(TORCH_INDEX),--build-arg TORCH_INDEX=$(TORCH_INDEX)) $(if $(RUNTIME_BASE),--build-arg BASE=$(RUNTIME_BASE)) .

## End-to-end tests on a real kind cluster (docs/e2e.md): make e2e-cluster, then
## FEDERATOR_E2E_KUBECONFIG=$$PWD/.e2e/kubeconfig make e2e  (skipped, with the reason, without it)
e2e-cluster: $(STAMP)
	bash tests/e2e/kind-up.sh
e2e: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/e2e

clean:
	rm -rf $(VENV) results .pytest_cache .mypy_cache .ruff_cache
