#!/usr/bin/env bash
# The participation-gap demo sweep (issue 16): FedAvg (apps/fedavg) on Fashion-MNIST, 20 clients
# of which 20% never train, label-based (IID, Dirichlet 0.1 / 0.5 / 100) and semantic partitions,
# 3 seeds, through the runner without Ray (launcher=local). Each sweep writes summary.md (mean
# +- std over seeds of the final metrics, the gap columns included) and a plot under
# outputs/multirun/fedavg/<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=.venv/bin/flowerbed-run
COMMON=(launcher=local app=fedavg app.num_supernodes=20 seed=0,1,2
  ++run_config.dataset=fashion_mnist ++run_config.model=mlp
  ++run_config.num-server-rounds="${ROUNDS:-15}" ++run_config.local-steps=20
  ++run_config.batch-size=32 ++run_config.lr=0.1
  ++run_config.unparticipating-fraction=0.2 ++run_config.val-fraction=0.2
  ++run_config.gap-eval-every=5
  "table.metrics=[accuracy,part_train_accuracy_mean,part_val_accuracy_mean,unpart_accuracy_mean,out_of_sample_gap_accuracy,participation_gap_accuracy,unpart_accuracy_p10,unpart_accuracy_p90]")
"$RUN" -m "${COMMON[@]}" partitioner=dirichlet ++run_config.alpha=0.1,0.5,100
"$RUN" -m "${COMMON[@]}" partitioner=iid,semantic
