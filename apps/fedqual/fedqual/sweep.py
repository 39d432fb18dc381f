"""Benchmark sweeps of the FedQual app: methods x disparity levels x seeds, then a table.

One command per benchmark (each run is one in-process Flower simulation, ``run_app``)::

    python -m fedqual.sweep --benchmark fer      # SBU_3DFE  (FER-LDL analogue)
    python -m fedqual.sweep --benchmark fi       # emotion6  (FI-LDL analogue)
    python -m fedqual.sweep --benchmark rating   # SCUT_FBP  (PIPAL/KADID analogue)
    python -m fedqual.sweep --benchmark fer --table-only    # re-render the table

``--engine local`` (default) runs the app's own ServerApp and ClientApp functions on an
in-process grid (:mod:`fedqual.local_engine`); ``--engine ray`` goes through
``flowerbed.simulation.inprocess.run_app`` (Flower's simulation engine, much slower on a loaded
2-core machine). Runs whose ``results.json`` already exists are skipped (a sweep can be resumed). Results go to
``outputs/fedqual-sweep/<benchmark>/<method>/level<level>/seed<seed>/results.json`` and the table
(mean +/- std over seeds of the six LDL measures on the clean test split) to ``summary.md`` beside
them. ``--methods``, ``--levels``, ``--seeds`` and ``--set key=value`` change the sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from flowerbed.common.ldl import LOWER_IS_BETTER, METRICS
from flowerbed.common.server import output_dir

BENCHMARKS = {
    "fer": {"dataset": "ldl/SBU_3DFE"},
    "fi": {"dataset": "ldl/emotion6", "weight-decay": 0.05},
    "rating": {"dataset": "ldl/SCUT_FBP"},
    "sjaffe": {"dataset": "ldl/SJAFFE"},
}
METHODS = ("fedqual", "fedavg", "fedprox", "local", "central-clean", "central-noisy")


def run_dir(root: Path, method: str, level: float, seed: int) -> Path:
    return root / method / f"level{level}" / f"seed{seed}"


def finished(folder: Path) -> dict | None:
    """The results of a completed run in ``folder`` (None if absent or interrupted)."""
    p = folder / "results.json"
    if not p.exists():
        return None
    rec = json.loads(p.read_text())
    return rec if "finished_at" in rec and "final" in rec["extra"] else None


def render(root: Path, methods, levels, seeds) -> str:
    """Markdown table: one row per (level, method), mean +/- std over the seeds found."""
    head = "| level | method | n | " + " | ".join(
        f"{m} {'(lower)' if LOWER_IS_BETTER[m] else '(higher)'}" for m in METRICS
    )
    lines = [head + " |", "|" + "---|" * (len(METRICS) + 3)]
    for level in levels:
        for method in methods:
            finals = []
            for s in seeds:
                rec = finished(run_dir(root, method, level, s))
                if rec is not None:
                    finals.append(rec["extra"]["final"])
            if not finals:
                continue
            cells = []
            for m in METRICS:
                v = [f[m] for f in finals]
                mu = sum(v) / len(v)
                sd = math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0
                cells.append(f"{mu:.4f} +/- {sd:.4f}")
            lines.append(f"| {level} | {method} | {len(finals)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", choices=sorted(BENCHMARKS), required=True)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--levels", default="0.3,0.9", help="corruption-level values")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--clients", type=int, default=5, help="virtual clients (num_supernodes)")
    ap.add_argument("--num-cpus", type=float, default=2, help="CPUs per Ray actor")
    ap.add_argument("--set", action="append", default=[], help="extra run config key=value")
    ap.add_argument("--out", default="", help="sweep folder (default outputs/fedqual-sweep/..)")
    ap.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: the app's ServerApp/ClientApp code on an in-process grid (fedqual."
        "local_engine, seconds per run); ray: flowerbed's run_app on Flower's simulation engine",
    )
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    levels = [float(v) for v in args.levels.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    root = Path(args.out) if args.out else output_dir(f"fedqual-sweep/{args.benchmark}", "fedqual")
    base = dict(BENCHMARKS[args.benchmark])
    for kv in args.set:
        k, _, v = kv.partition("=")
        base[k] = v
    if not args.table_only:
        import torch

        from fedqual.local_engine import run_local
        from fedqual.task import parse_config
        from flowerbed.simulation.inprocess import run_app

        torch.set_num_threads(1)

        # the highest level first: it carries the paper's claim
        for level in sorted(levels, reverse=True):
            for seed in seeds:
                for method in methods:
                    out = run_dir(root, method, level, seed)
                    if finished(out) is not None:
                        continue
                    over = {**base, "method": method, "corruption-level": level, "seed": seed}
                    over["results-dir"] = str(out.resolve())
                    parse_config(over)  # one-line error before anything starts
                    t0 = time.perf_counter()
                    if args.engine == "local":
                        run_local(over, num_nodes=args.clients)
                    else:
                        run_app(
                            "fedqual", over, num_supernodes=args.clients, num_cpus=args.num_cpus
                        )
                    print(
                        f"[sweep] {args.benchmark} {method} level={level} seed={seed} "
                        f"{time.perf_counter() - t0:.1f} s",
                        flush=True,
                    )
    table = render(root, methods, levels, seeds)
    (root / "summary.md").parent.mkdir(parents=True, exist_ok=True)
    (root / "summary.md").write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
