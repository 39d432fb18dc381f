"""Evaluations-to-converge of GMMA vs RMMA from a sweep's ``results.json`` files.

``python -m matchmerge.convergence <sweep folder> [--tol 0.001]`` prints, per seed, for each
search: its final dev CER, the evaluations it made, the evaluations until its best dev CER came
within ``tol`` of its own final best (``own``, what ``evals-to-converge`` records), until it
reached its own final best exactly (``exact``), and until it came within ``tol`` of the better of
the two searches' final dev CER (``common``: a shared target; ``-`` if never reached). The last
line gives the GMMA / RMMA ratios of the means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SEARCHES = ("gmma", "rmma")


def first_within(curve: list[float], target: float, tol: float) -> int | None:
    """1-based index of the first value of ``curve`` that is ``<= target + tol`` (None: never)."""
    return next((i + 1 for i, v in enumerate(curve) if v <= target + tol), None)


def rows(folder: Path) -> dict[int, dict[str, dict]]:
    out: dict[int, dict[str, dict]] = {}
    for path in sorted(folder.rglob("results.json")):
        rec = json.loads(path.read_text())
        method, seed = rec["config"]["method"], int(rec["config"]["seed"])
        if method not in SEARCHES or "final" not in rec["extra"]:
            continue
        row = next(r for r in rec["rounds"] if r["round"] == 1)
        out.setdefault(seed, {})[method] = {
            "curve": row["dev_best_curve"],
            "commit": rec["git_commit"][:7],
        }
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m matchmerge.convergence", description=__doc__)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--tol", type=float, default=0.001)
    a = ap.parse_args(argv)
    table = rows(a.folder)
    print("| seed | search | final dev CER | evaluations | own | exact | common | commit |")
    print("|---|---|---|---|---|---|---|---|")
    stats: dict[str, dict[str, list]] = {
        s: {"own": [], "exact": [], "common": []} for s in SEARCHES
    }
    for seed, by in sorted(table.items()):
        if set(by) != set(SEARCHES):
            continue
        target = min(by[s]["curve"][-1] for s in SEARCHES)
        for s in SEARCHES:
            c = by[s]["curve"]
            own, exact = first_within(c, c[-1], a.tol), first_within(c, c[-1], 0.0)
            common = first_within(c, target, a.tol)
            for k, v in (("own", own), ("exact", exact), ("common", common)):
                stats[s][k].append(v)
            print(
                f"| {seed} | {s} | {c[-1]:.4f} | {len(c)} | {own} | {exact} | "
                f"{common if common is not None else '-'} | {by[s]['commit']} |"
            )
    for k in ("own", "exact", "common"):
        g = [v for v in stats["gmma"][k] if v is not None]
        r = [v for v in stats["rmma"][k] if v is not None]
        if g and r:
            print(
                f"{k}: GMMA mean {np.mean(g):.1f}, RMMA mean {np.mean(r):.1f}, "
                f"GMMA/RMMA {np.mean(g) / np.mean(r):.2f} (seeds with a value: {len(g)}, {len(r)})"
            )


if __name__ == "__main__":
    main()
