#!/usr/bin/env bash
# Runs behind the README section "Does projection help?": split-avg, split-pcgrad and fedbone,
# seeds 0 1 2, 4 rounds x 20 split steps, in two settings:
#   three: 3 clients, one per task (the app's default federation)
#   six:   6 clients, two per task (client k holds task k mod 3)
# Every results.json carries the per-step projection diagnostics (pc_change_steps, cos_steps, ...).
# Usage: bash apps/fedbone/docs/projection_runs.sh [three|six ...]
#   RUN_PREFIX="/work/bin/cpu-slot" to queue each run on a shared machine (one run ~1.5-4 min on
#   2 CPU cores); OUT (default outputs/fedbone_projection) holds one folder per run; a run whose
#   results.json exists is skipped.
set -euo pipefail
OUT=${OUT:-outputs/fedbone_projection}
ROUNDS=${ROUNDS:-4}
settings=("${@:-three six}")
for setting in ${settings[@]}; do
  case $setting in
    three) nodes=3 ;;
    six) nodes=6 ;;
    *) echo "unknown setting $setting (three | six)" >&2; exit 2 ;;
  esac
  for seed in 0 1 2; do
    for method in split-avg split-pcgrad fedbone; do
      dir=$OUT/$setting/${method}_s$seed
      if [ -f "$dir/0/results.json" ]; then echo "skip $dir"; continue; fi
      mkdir -p "$(dirname "$dir")"
      echo "[$(date -u +%H:%M:%S)] $setting seed=$seed method=$method -> $dir"
      ${RUN_PREFIX:-} .venv/bin/flowerbed-run -m app=fedbone app.num_supernodes=$nodes launcher=local \
        seed=$seed ++run_config.method=$method ++run_config.num-server-rounds=$ROUNDS \
        hydra.sweep.dir=$dir > "$dir.log" 2>&1 || { tail -20 "$dir.log"; exit 1; }
    done
  done
done
