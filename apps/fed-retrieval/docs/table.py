"""The README table of issue #17: recall@{1,5,10} and mean rank for every loss x {centralized,
federated, IID-federated}, seeds, and the relative federated-vs-centralized gap per loss.

    OMP_NUM_THREADS=1 .venv/bin/python apps/fed-retrieval/docs/table.py --seeds 0 1 2

runs every missing cell (one results.json per method and seed under ``--out``, skipped when it
exists, so the sweep can be split: ``--losses batch-softmax --seeds 0``), then prints the
table from every results file found. ``--report`` only prints.

Settings (the README's "Reconstruction" rows): client SGD lr 0.1, softmax temperature 0.1,
whole-table spreadout 0.01 (hinge-spreadout only), batch 16, 1 local epoch, server Adam lr 1.0;
centralized = ``--epochs`` epochs over the pooled train users; federated = 50 nodes hosting the
754 train users, ``--fraction`` of the nodes per round, ``--rounds`` rounds (with 0.2 and 15
rounds the clients see the train examples about 3 times: the same SGD steps as 3 epochs).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

LOSSES = ("batch-softmax", "batch-softmax-spreadout", "global-softmax", "hinge-spreadout")
SETTINGS = ("centralized", "federated", "iid")
METRICS = ("recall@1", "recall@5", "recall@10", "mean-rank")
BATCH_INSENSITIVE = ("global-softmax", "hinge-spreadout")


def method(loss: str, setting: str) -> str:
    return {"centralized": f"{loss}-centralized", "federated": loss, "iid": f"{loss}-iid"}[setting]


def run_cell(args, loss: str, setting: str, seed: int) -> None:
    from flowerbed.simulation.local import run_local

    out = args.out / f"{method(loss, setting)}-seed{seed}"
    if (out / "results.json").exists():
        return
    rounds = args.epochs if setting == "centralized" else args.rounds
    over = {
        "method": method(loss, setting),
        "seed": seed,
        "num-server-rounds": rounds,
        "fraction-train": args.fraction,
        "lr": args.lr,
        "temperature": args.temperature,
        "table-spreadout-lambda": args.table_lambda,
        "device": "cpu",
        "results-dir": str(out.resolve()),
    }
    t0 = time.time()
    print(f"[table] {method(loss, setting)} seed {seed}: {rounds} rounds ...", flush=True)
    run_local("fed-retrieval", over, num_supernodes=args.nodes)
    print(f"[table] {method(loss, setting)} seed {seed}: {time.time() - t0:.0f}s", flush=True)


def load(out: Path) -> dict:
    """``{(loss, setting): [final metrics per seed]}`` and the commits of the runs."""
    cells, commits = {}, set()
    for f in sorted(out.glob("*-seed*/results.json")):
        rec = json.loads(f.read_text())
        name = rec["config"]["method"]
        for loss in LOSSES:
            for setting in SETTINGS:
                if method(loss, setting) == name:
                    cells.setdefault((loss, setting), []).append(rec["extra"]["final"])
        commits.add(str(rec.get("git_commit", "?")))
    return cells, commits


def fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def report(out: Path) -> str:
    cells, commits = load(out)
    lines = [
        "| loss | setting | seeds | recall@1 | recall@5 | recall@10 | mean rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for loss in LOSSES:
        for setting in SETTINGS:
            runs = cells.get((loss, setting), [])
            vals = [fmt([r[m] for r in runs], 1 if m == "mean-rank" else 4) for m in METRICS]
            lines.append(f"| {loss} | {setting} | {len(runs)} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "| loss | batch-insensitive | gap fed vs central (recall@10) | gap IID vs central |",
        "|---|---|---|---|",
    ]
    for loss in LOSSES:
        c = [r["recall@10"] for r in cells.get((loss, "centralized"), [])]
        gaps = []
        for setting in ("federated", "iid"):
            f = [r["recall@10"] for r in cells.get((loss, setting), [])]
            if c and f:
                mc, mf = statistics.fmean(c), statistics.fmean(f)
                gaps.append(f"{100 * (mc - mf) / mc:.1f} %")
            else:
                gaps.append("-")
        yes = "yes" if loss in BATCH_INSENSITIVE else "no"
        lines.append(f"| {loss} | {yes} | {gaps[0]} | {gaps[1]} |")
    lines.append("")
    lines.append(f"commits of the runs: {', '.join(sorted(commits))}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--out", type=Path, default=Path("outputs/fed-retrieval/table"))
    ap.add_argument("--epochs", type=int, default=3, help="centralized epochs")
    ap.add_argument("--rounds", type=int, default=15, help="federated rounds")
    ap.add_argument("--fraction", type=float, default=0.2, help="nodes per round")
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--table-lambda", type=float, default=0.01)
    ap.add_argument("--report", action="store_true", help="only print the table")
    args = ap.parse_args()
    if not args.report:
        for seed in args.seeds:
            for loss in args.losses:
                for setting in args.settings:
                    run_cell(args, loss, setting, seed)
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
