"""Ten-fold cross-validation of the app's model, trained centrally on clean SJAFFE labels.

Sanity check of the model and of the six measures against the published centralized LDL
baselines on SJAFFE (AA-BP: KL <= .073, Cosine >= .931; SA-BFGS: KL .051, Cosine .954)::

    python -m fedqual.sjaffe_cv                 # 10-fold CV, defaults of the app's model
    python -m fedqual.sjaffe_cv --repeats 3     # 10-fold CV repeated with 3 shuffles

Features are standardised with the training folds' statistics; each fold trains the app's MLP
(``make_model``) with the app's training settings (``train_kwargs``: Adam on the KL loss, the
shared loop :func:`flowerbed.common.train.train`) for ``--epochs`` epochs.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import scipy.io
import torch

from fedqual.ldl import METRICS, ldl_metrics
from fedqual.task import SCHEMA, make_model, predict, train_kwargs
from flowerbed.common.data import _ldl_dir
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.train import train as train_loop


def load_mat(name: str = "SJAFFE", data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features and label distributions of an LDL ``.mat`` file (no split, no scaling)."""
    mat = scipy.io.loadmat(_ldl_dir(data_dir) / f"{name}.mat")
    x = np.asarray(mat["features"], dtype=np.float64)
    d = np.clip(np.asarray(mat["labels"], dtype=np.float64), 0, None)
    return x, d / d.sum(1, keepdims=True)


def cross_validate(
    x: np.ndarray,
    d: np.ndarray,
    cfg: dict,
    epochs: int,
    folds: int = 10,
    repeats: int = 1,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Mean and std over folds x repeats of the six measures."""
    scores = {m: [] for m in METRICS}
    for rep in range(repeats):
        order = np.random.default_rng(derive_seed(seed, rep)).permutation(len(x))
        for k, test in enumerate(np.array_split(order, folds)):
            train = np.setdiff1d(order, test)
            mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
            xtr = torch.from_numpy(((x[train] - mu) / sd).astype(np.float32))
            xte = torch.from_numpy(((x[test] - mu) / sd).astype(np.float32))
            model = make_model({**cfg, "seed": derive_seed(seed, rep, k)}, x.shape[1], d.shape[1])
            train_loop(
                model,
                xtr,
                torch.from_numpy(d[train].astype(np.float32)),
                generator=set_seed(derive_seed(seed, rep, k, 1)),
                device=torch.device("cpu"),
                **train_kwargs({**cfg, "local-epochs": epochs}),
            )
            res = ldl_metrics(d[test], predict(model, xte, torch.device("cpu")))
            for m in METRICS:
                scores[m].append(res[m])
    return {m: (float(np.mean(v)), float(np.std(v))) for m, v in scores.items()}


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="SJAFFE")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=SCHEMA["hidden"].default)
    ap.add_argument("--layers", type=int, default=SCHEMA["layers"].default)
    ap.add_argument("--lr", type=float, default=SCHEMA["lr"].default)
    ap.add_argument("--weight-decay", type=float, default=SCHEMA["weight-decay"].default)
    ap.add_argument("--batch-size", type=int, default=SCHEMA["batch-size"].default)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = {
        "hidden": args.hidden,
        "layers": args.layers,
        "lr": args.lr,
        "weight-decay": args.weight_decay,
        "batch-size": args.batch_size,
    }
    t0 = time.perf_counter()
    x, d = load_mat(args.dataset, args.data_dir)
    res = cross_validate(x, d, cfg, args.epochs, args.folds, args.repeats, args.seed)
    print(f"{args.dataset} {args.folds}-fold CV x {args.repeats}, {args.epochs} epochs, {cfg}")
    print("| " + " | ".join(METRICS) + " |")
    print("|" + "---|" * len(METRICS))
    print("| " + " | ".join(f"{res[m][0]:.4f} +/- {res[m][1]:.4f}" for m in METRICS) + " |")
    print(json.dumps({m: round(v[0], 4) for m, v in res.items()}))
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    return res


if __name__ == "__main__":
    main()
