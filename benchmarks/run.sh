#!/usr/bin/env bash
# Benchmarks against peers; writes docs/benchmarks.md and its plots. Called by `make bench`.
#   benchmarks/run.sh                      # everything (about 10 minutes on 2 cores)
#   benchmarks/run.sh --only quickstart    # arguments go to benchmarks/bench_flower.py (see --help)
#   benchmarks/run.sh transfer             # only model transfer (benchmarks/transfer.py)
#   benchmarks/run.sh compression          # only compression: accuracy vs ratio, codec throughput
#   benchmarks/run.sh operator --count 100 # only the operator reconciling Federations against kmock
#   benchmarks/run.sh attack               # only accuracy under attack (benchmarks/attack_accuracy.py)
#   benchmarks/run.sh robust               # only robust-aggregation throughput against byzfl
#   benchmarks/run.sh startup --runs 5     # only the quickstart's start-up (benchmarks/startup.py)
#   benchmarks/run.sh scale                # only server cost per task (1,000 clients) and 500 workers
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
VENV="${VENV:-.venv}"
BENCH_VENV="${BENCH_VENV:-.venv-bench}"
BYZFL_VENV="${BYZFL_VENV:-.venv-byzfl}"
PIP_FLAGS=(--quiet --disable-pip-version-check --constraint constraints.txt)

# Federator and the harness: the project's virtualenv (created by `make install` when missing).
if [[ ! -x "$VENV/bin/federator" ]]; then
  make install PYTHON="$PYTHON" VENV="$VENV"
fi

# Flower: its own virtualenv, (re)installed when benchmarks/requirements.txt changes.
stamp="$BENCH_VENV/.installed"
if [[ ! -f "$stamp" || benchmarks/requirements.txt -nt "$stamp" || constraints.txt -nt "$stamp" ]]; then
  echo "creating $BENCH_VENV (Flower) from benchmarks/requirements.txt"
  "$PYTHON" -m venv "$BENCH_VENV"
  "$BENCH_VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --upgrade pip
  "$BENCH_VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" -r benchmarks/requirements.txt
  touch "$stamp"
fi

# byzfl: its own virtualenv for the robust-aggregation benchmark. byzfl requires torchvision, which has no
# build for torch 2.13 here and which its rules never use: byzfl goes in without its dependencies, they
# go in by hand, and the benchmark gives it an inert stand-in torchvision module.
byzfl_venv() {
  local stamp="$BYZFL_VENV/.installed-byzfl-0.0.11"
  if [[ ! -f "$stamp" || constraints.txt -nt "$stamp" ]]; then
    echo "creating $BYZFL_VENV (byzfl 0.0.11)"
    "$PYTHON" -m venv "$BYZFL_VENV"
    "$BYZFL_VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" torch numpy scipy matplotlib seaborn
    "$BYZFL_VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --no-deps byzfl==0.0.11
    touch "$stamp"
  fi
}

# Model transfer against loopback and plain gRPC, and the operator against kmock: no extra virtualenv.
case "${1:-}" in
  transfer) exec "$VENV/bin/python" benchmarks/transfer.py "${@:2}" ;;
  compression) exec "$VENV/bin/python" benchmarks/compression.py "${@:2}" ;;
  operator) exec "$VENV/bin/python" benchmarks/operator_reconcile.py "${@:2}" ;;
  attack) exec "$VENV/bin/python" benchmarks/attack_accuracy.py "${@:2}" ;;
  robust) byzfl_venv; exec "$VENV/bin/python" benchmarks/robust_throughput.py --byzfl-python "$BYZFL_VENV/bin/python" "${@:2}" ;;
  startup) exec "$VENV/bin/python" benchmarks/startup.py "${@:2}" ;;
  scale) exec "$VENV/bin/python" benchmarks/scale.py "${@:2}" ;;
esac
"$VENV/bin/python" benchmarks/bench_flower.py --federator "$VENV/bin/federator" --bench-venv "$BENCH_VENV" "$@"
if [[ $# -eq 0 ]]; then
  "$VENV/bin/python" benchmarks/transfer.py
  "$VENV/bin/python" benchmarks/compression.py
  "$VENV/bin/python" benchmarks/operator_reconcile.py
  "$VENV/bin/python" benchmarks/attack_accuracy.py
  byzfl_venv
  "$VENV/bin/python" benchmarks/robust_throughput.py --byzfl-python "$BYZFL_VENV/bin/python"
  "$VENV/bin/python" benchmarks/startup.py
  "$VENV/bin/python" benchmarks/scale.py
fi
