"""The README's target tables (issue #15: "within 3 points of its no-attack accuracy"): for one
method and one malicious fraction, per attack the final accuracy of each seed, mean ± std over
seeds, and the gap to the no-attack run of the same seed, from every ``results.json`` below the
given folders (the no-attack runs may sit in another folder: the attack fraction does not
change a run without attack: Krum, MultiKrum and Bulyan get f = 0 when ``attack=none``). METHOD may be a comma-separated list
(one block of rows per method); only the seeds with an attacked run get a column.

    .venv/bin/python apps/fedidm/docs/target_table.py [--last K] METHOD[,METHOD...] FRACTION FOLDER ...

``--last K``: each run's number is the mean server accuracy of its last K rounds instead of the
final accuracy (the final round alone moves by 2-4 points between consecutive rounds).

Reads only; runs nothing.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np

from flowerbed.simulation.table import collect

ATTACKS = ("sign-flip", "gaussian", "label-flip", "lie", "min-max", "min-sum", "ipm")


def accuracy(run: dict, last: int = 0) -> float:
    """Final accuracy, or the mean server accuracy of the last ``last`` rounds."""
    if not last:
        return run["extra"]["final"]["accuracy"]
    acc = [r["server_accuracy"] for r in run["rounds"] if r["round"] > 0]
    return float(np.mean(acc[-last:]))


def cells(method: str, fraction: float, folders: list[str], last: int = 0):
    """(attack -> seed -> accuracy, seed -> no-attack accuracy, commits) of ``method``."""
    acc: dict[str, dict[int, float]] = defaultdict(dict)
    clean: dict[int, float] = {}
    commits: set[str] = set()
    for folder in folders:
        for r in collect(folder):
            c, final = r["config"], r["extra"].get("final", {})
            if c.get("method") != method or "accuracy" not in final:
                continue
            if c["attack"] == "none":
                clean[c["seed"]] = accuracy(r, last)
            elif abs(c["attack-fraction"] - fraction) < 1e-9:
                acc[c["attack"]][c["seed"]] = accuracy(r, last)
            else:
                continue
            commits.add(r["git_commit"][:7])
    return acc, clean, commits


def table(methods: str, fraction: float, folders: list[str], last: int = 0) -> list[str]:
    blocks = {m: cells(m, fraction, folders, last) for m in methods.split(",")}
    seeds = sorted({s for acc, _, _ in blocks.values() for per in acc.values() for s in per})
    head = " | ".join(f"seed {s}" for s in seeds)
    out = [
        f"{fraction:.0%} malicious; "
        + (f"mean accuracy of the last {last} rounds; " if last else "final accuracy; ")
        + "runs' commits "
        + ", ".join(sorted(set().union(*(c for _, _, c in blocks.values())))),
        f"| method | attack | {head} | mean ± std | gap to no attack per seed (points) | mean gap |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for method, (acc, clean, _) in blocks.items():
        out.append(
            f"| {method} | none | "
            + " | ".join(f"{clean[s]:.4f}" if s in clean else "–" for s in seeds)
            + " | | | |"
        )
        out += _rows(method, acc, clean, seeds)
    return out


def _rows(method, acc, clean, seeds) -> list[str]:
    out = []
    for attack in ATTACKS:
        per = acc.get(attack)
        if not per:
            continue
        vals = [per[s] for s in sorted(per)]
        gaps = {s: 100 * (per[s] - clean[s]) for s in sorted(per) if s in clean}
        row = [f"{per[s]:.4f}" if s in per else "–" for s in seeds]
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        flag = [f"**{g:+.1f}**" if g < -3 else f"{g:+.1f}" for g in gaps.values()]
        mean_gap = float(np.mean(list(gaps.values()))) if gaps else float("nan")
        out.append(
            f"| {method} | {attack} | {' | '.join(row)} | {np.mean(vals):.4f} ± {std:.4f} | "
            f"{' / '.join(flag) or '–'} | {mean_gap:+.1f} |"
        )
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    k = 0
    if args[0] == "--last":
        k = int(args[1])
        args = args[2:]
    print("\n".join(table(args[0], float(args[1]), args[2:], k)))
