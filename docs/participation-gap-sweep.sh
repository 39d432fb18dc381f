#!/usr/bin/env bash
# The participation-gap demo sweep (issue 16): FedAvg (apps/fedavg) on Fashion-MNIST, 20 clients
# of which 20% never train, label-based (IID, Dirichlet 0.1 / 0.5 / 100) and semantic partitions,
# through the runner without Ray (launcher=local). Each sweep writes summary.md (mean +- std over
# seeds of the final metrics, the gap columns included), a plot and one results.json per run
# (with the per-client rows `gap_clients`) under outputs/multirun/fedavg/<time>/.
#
#   bash docs/participation-gap-sweep.sh                 # every group, seeds 0,1,2 (~15 min)
#   SEEDS=3,4 bash docs/participation-gap-sweep.sh dir-low   # one group, other seeds
#   CLIENTS=100 ALPHAS=0.5 bash docs/participation-gap-sweep.sh dir-low   # 100 clients, one alpha
#   CLIENTS=300 ROUNDS=45 SEEDS=0 bash docs/participation-gap-sweep.sh sem-cnn   # 300 clients, 45 rounds
#   (docs/participation_gap_reproduce.py calls this script for every run its plan misses)
#
# Groups: dir-low (Dirichlet alpha 0.1 and 0.5, or ALPHAS), dir-100 (alpha 100), iid-sem (IID,
# semantic), sem, sem-cnn / sem-pix (semantic
# with the CNN embedder / on PCA of the pixels), iid, label-dir (the authors' equal-size label-Dirichlet, ALPHAS default 0.1).
# Runs take 35-60 s each on 2 cores; on the shared build machine each group was run as its own
# command (each under 8 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=.venv/bin/flowerbed-run
COMMON=(launcher=local app=fedavg app.num_supernodes="${CLIENTS:-20}" seed="${SEEDS:-0,1,2}"
  ++run_config.dataset=fashion_mnist ++run_config.model=mlp
  ++run_config.num-server-rounds="${ROUNDS:-15}" ++run_config.local-steps=20
  ++run_config.batch-size=32 ++run_config.lr=0.1
  ++run_config.unparticipating-fraction=0.2 ++run_config.val-fraction=0.2
  ++run_config.gap-eval-every=5
  "table.metrics=[accuracy,part_val_accuracy_mean,unpart_accuracy_mean,out_of_sample_gap_accuracy,participation_gap_accuracy,participation_gap_accuracy_weighted,unpart_accuracy_p10,unpart_accuracy_p90]")
groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(dir-low dir-100 iid-sem)
for g in "${groups[@]}"; do
  case "$g" in
    dir-low) "$RUN" -m "${COMMON[@]}" partitioner=dirichlet ++run_config.alpha="${ALPHAS:-0.1,0.5}" ;;
    label-dir) "$RUN" -m "${COMMON[@]}" partitioner=label-dirichlet ++run_config.alpha="${ALPHAS:-0.1}" ;;
    dir-100) "$RUN" -m "${COMMON[@]}" partitioner=dirichlet ++run_config.alpha=100 ;;
    iid-sem) "$RUN" -m "${COMMON[@]}" partitioner=iid,semantic ;;
    sem) "$RUN" -m "${COMMON[@]}" partitioner=semantic ;;
    sem-cnn) "$RUN" -m "${COMMON[@]}" partitioner=semantic-cnn ;;
    sem-pix) "$RUN" -m "${COMMON[@]}" partitioner=semantic-pixels ;;
    iid) "$RUN" -m "${COMMON[@]}" partitioner=iid ;;
    *) echo "unknown group $g (dir-low, dir-100, iid-sem, sem, sem-cnn, sem-pix, iid, label-dir)" >&2; exit 2 ;;
  esac
done
