"""``python -m tofdistill.table``: the README's tiny-model table in one command.

Every cell (method x seed) is one run of this app on the runner's ``launcher=local`` grid
(:func:`flowerbed.simulation.local.run_local`, 4 nodes, the settings of :data:`TINY`), written to
``<out>/<method>-s<seed>/results.json``; a cell whose results file is complete (has
``finished_at``) is kept, so the command resumes where a previous call stopped and can be split
into short calls (``--methods``, ``--seeds``, ``--max-runs``). At the end (or with
``--render-only``) it prints the table of every complete cell, mean +/- std over seeds
(:func:`flowerbed.simulation.table.render`), and writes ``<out>/summary.md``::

    cd apps/tof-distillation
    ../../.venv/bin/python -m tofdistill.table --out ../../outputs/tof-tiny-table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tofdistill.methods import METHODS

#: the tiny-model table's run config (the rest: the app's pyproject defaults)
TINY = {
    "model": "tiny",
    "synthetic-per-task": 30,
    "local-steps": 20,
    "batch-size": 16,
    "lr": 0.01,
    "eval-users": 4,
    "decode": "score",
}
#: the metrics of the README table
METRICS = [
    "success",
    "inform",
    "action_accuracy",
    "chart_node_coverage",
    "chart_edge_recall",
    "flowchart_edge_recall",
]


def complete(cell: Path) -> bool:
    """Whether ``cell`` holds a finished run's ``results.json``."""
    res = cell / "results.json"
    if not res.exists():
        return False
    try:
        return "finished_at" in json.loads(res.read_text())
    except json.JSONDecodeError:
        return False


def cells(methods: list[str], seeds: list[int], out: Path) -> list[tuple[str, int, Path]]:
    """The (method, seed, folder) of every cell, seed-major."""
    return [(m, s, out / f"{m}-s{s}") for s in seeds for m in methods]


def main(argv: list[str] | None = None) -> str:
    from flowerbed.simulation.local import run_local
    from flowerbed.simulation.table import render

    ap = argparse.ArgumentParser(prog="python -m tofdistill.table", description=__doc__)
    ap.add_argument("--out", default="outputs/tof-tiny-table", help="the table's folder")
    ap.add_argument("--methods", default=",".join(METHODS.names), help="comma-separated")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated")
    ap.add_argument("--max-runs", type=int, default=0, help="stop after this many runs (0: all)")
    ap.add_argument("--render-only", action="store_true", help="only print the table")
    a = ap.parse_args(argv)
    out = Path(a.out)
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        METHODS.resolve(m)  # an unknown method stops here, naming it
    todo = cells(methods, [int(s) for s in a.seeds.split(",")], out)
    done = 0
    for i, (method, seed, cell) in enumerate(todo, 1):
        if a.render_only or (a.max_runs and done >= a.max_runs):
            break
        if complete(cell):
            print(f"[tof-table] {i}/{len(todo)} {cell.name}: kept", flush=True)
            continue
        t0 = time.perf_counter()
        print(f"[tof-table] {i}/{len(todo)} {cell.name}: running", flush=True)
        cell.mkdir(parents=True, exist_ok=True)
        cfg = {**TINY, "method": method, "seed": seed, "results-dir": str(cell.resolve())}
        run_local("tof-distillation", cfg, num_supernodes=4, num_cpus=1)
        done += 1
        final = json.loads((cell / "results.json").read_text())["extra"]["final"]
        shown = ", ".join(f"{k}={final[k]:.4f}" for k in METRICS[:3])
        print(f"[tof-table] {cell.name}: {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)
    missing = [c.name for _, _, c in todo if not complete(c)]
    if missing:
        print(f"[tof-table] not yet run: {', '.join(missing)}", flush=True)
    return render(out, rows=["method"], metrics=METRICS)


if __name__ == "__main__":
    main()
