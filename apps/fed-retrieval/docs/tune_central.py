"""Centralized recall@10 per epoch for a few loss settings (the app's own ``central_fit`` and
``evaluator``): which temperature / learning rate / spreadout weight makes each loss learn.

    OMP_NUM_THREADS=1 .venv/bin/python apps/fed-retrieval/docs/tune_central.py \\
        --loss batch-softmax --epochs 3 --set temperature=1,lr=0.01 --set temperature=0.05,lr=0.1

Each ``--set`` is a comma-separated list of run-config overrides; one line per epoch is printed
(test recall@{1,5,10}, mean rank, validation recall@10).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedretrieval import task  # noqa: E402


def _value(v: str):
    """A number when ``v`` parses as JSON (``0.1``, ``3``), else the string."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loss", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--set", action="append", default=[], help="k=v,k=v run-config overrides")
    args = ap.parse_args()
    for setting in args.set or [""]:
        over = dict(kv.split("=", 1) for kv in setting.split(",") if kv)
        rc = {"method": f"{args.loss}-centralized", "device": "cpu", "seed": args.seed}
        rc.update({k: _value(v) for k, v in over.items()})
        cfg = task.parse_config(rc)
        fit, evaluate = task.central_fit(cfg), task.evaluator(cfg)
        arrays = task.initial_arrays(cfg)
        t0 = time.time()
        for ep in range(1, args.epochs + 1):
            arrays, m = fit(ep, arrays)
            r = evaluate(arrays)
            print(
                f"{args.loss} {setting or 'defaults'} epoch {ep}: "
                f"r@1 {r['recall@1']:.4f} r@5 {r['recall@5']:.4f} r@10 {r['recall@10']:.4f} "
                f"rank {r['mean-rank']:.0f} val-r@10 {r['val-recall@10']:.4f} "
                f"loss {m['train_loss']:.4f} ({time.time() - t0:.0f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
