#!/usr/bin/env bash
# Reproduce the README table: {FedDistr, FedAvg (50 rounds, read at 1/10/50), centralized}
# x {disentangled, near, entangled} x seeds 0,1,2, on 5 clients, then render it.
#   bash apps/feddistr/reproduce.sh [OUT_DIR] [extra flowerbed-run overrides...]
# Run from the repository root. The three partition sweeps run in parallel (PARALLEL=0: in turn).
set -euo pipefail
OUT=${1:-outputs/feddistr-table}
shift || true
mkdir -p "$OUT"
export FLWR_TELEMETRY_ENABLED=0
PYTHONPATH=apps/feddistr python -m feddistr.pretrain   # the shared generator (cached)
pids=()
for part in disentangled near entangled; do
  cmd=(flowerbed-run -m app=feddistr "++run_config.partition=$part"
       "++run_config.method=feddistr,fedavg,centralized" seed=0,1,2
       "hydra.sweep.dir=$OUT/$part" "$@")
  if [[ "${PARALLEL:-1}" == 1 ]]; then
    "${cmd[@]}" > "$OUT/$part.log" 2>&1 &
    pids+=($!)
  else
    "${cmd[@]}"
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
PYTHONPATH=apps/feddistr python -m feddistr.report "$OUT"
