"""Diagnostics of the matching/fusion step (no Flower, no privacy unless ``--epsilon`` > 0).

::

    python -m privfusion.diagnose --dataset breast_cancer --partitioner dirichlet --alpha 1.0

Trains the parties' models exactly as the app does (``train_party``, same seeds), computes their
activation profiles (noise-free), and prints per party the class counts, test accuracy and dead
hidden units; then plain averaging, the output ensemble, and matched fusion for every choice of
reference party and activation weight; and a known-permutation check on a TRAINED model (party
0's model with its hidden neurons shuffled must be recovered exactly).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from privfusion.matching import average_layers, match, permute_layers
from privfusion.task import (
    accuracy,
    activation_stats,
    hidden_activations,
    layers_of,
    make_model,
    parse_config,
    party_data,
    predict_proba,
    reliable_classes,
    set_layers,
    test_data,
    train_party,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="breast_cancer")
    ap.add_argument("--parties", type=int, default=3)
    ap.add_argument("--partitioner", default="dirichlet")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--hidden", default="16,8")
    ap.add_argument("--local-epochs", type=int, default=5)
    ap.add_argument("--epsilon", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-samples", type=int, default=0)
    ap.add_argument("--test-samples", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = parse_config(
        {
            "dataset": args.dataset,
            "partitioner": args.partitioner,
            "alpha": args.alpha,
            "hidden": args.hidden,
            "local-epochs": args.local_epochs,
            "epsilon": args.epsilon,
            "seed": args.seed,
            "batch-size": 32 if args.dataset == "breast_cancer" else 128,
            "max-samples": args.max_samples,
            "test-samples": args.test_samples,
        },
        args.parties,
    )
    xt, yt, bundle = test_data(cfg)
    nc = bundle.num_classes
    models, acts, counts_all = [], [], []
    for pid in range(args.parties):
        m, _ = train_party(cfg, pid, args.parties)
        x, y, _ = party_data(cfg, pid, args.parties)
        a, cnt, _ = activation_stats(m, x, y, nc, 2000, math.inf, 0.0, 1)
        dead = [int((h.max(0).values == 0).sum()) for h in hidden_activations(m, x)]
        acc = accuracy(predict_proba(m, xt), yt)
        counts = np.bincount(y.numpy(), minlength=nc).tolist()
        print(f"party {pid}: class counts {counts} accuracy {acc:.3f} dead units {dead}")
        models.append(m)
        acts.append(a)
        counts_all.append(cnt)
    layers = [layers_of(m) for m in models]

    def ev(ls) -> float:
        return accuracy(predict_proba(set_layers(make_model(cfg, xt.shape[1:], nc, 0), ls), xt), yt)

    ens = accuracy(sum(predict_proba(m, xt) for m in models) / len(models), yt)
    print(f"plain averaging {ev(average_layers(layers)):.3f}  output ensemble {ens:.3f}")
    for ref in range(args.parties):
        for aw in (0.0, 0.5):
            aligned = [layers[ref]] + [
                permute_layers(
                    layers[p],
                    match(layers[ref], layers[p], acts[ref], acts[p], "hungarian", act_weight=aw),
                )
                for p in range(args.parties)
                if p != ref
            ]
            print(
                f"matched fusion, reference party {ref}, act-weight {aw}, all classes: "
                f"{ev(average_layers(aligned)):.3f}"
            )
        aligned = [layers[ref]]  # the app's path: classes with < 5 records left out
        for p in range(args.parties):
            if p == ref:
                continue
            keep = reliable_classes(counts_all[ref], counts_all[p], 0.0)
            aa = [a[:, keep] for a in acts[ref]] if keep.any() else None
            ab = [a[:, keep] for a in acts[p]] if keep.any() else None
            perm = match(layers[ref], layers[p], aa, ab, "hungarian", act_weight=0.5)
            aligned.append(permute_layers(layers[p], perm))
        print(
            f"matched fusion, reference party {ref}, act-weight 0.5, reliable classes only "
            f"(the app): {ev(average_layers(aligned)):.3f}"
        )
    rng = np.random.default_rng(123)
    true = [rng.permutation(len(b)) for _, b in layers[0][:-1]]
    shuffled = permute_layers(layers[0], true)
    shuffled_acts = [a[t] for a, t in zip(acts[0], true, strict=True)]
    perms = match(layers[0], shuffled, acts[0], shuffled_acts, "hungarian", act_weight=0.5)
    exact = all(np.array_equal(t[p], np.arange(len(p))) for p, t in zip(perms, true, strict=True))
    print(f"known permutation of party 0's trained model recovered exactly: {exact}")


if __name__ == "__main__":
    main()
