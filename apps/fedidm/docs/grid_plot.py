"""The README's grid plot: final accuracy per method and attack (bars; the error bar is the std
of the accuracy over the last 10 rounds, i.e. stability), from every ``results.json`` below a
folder.

    .venv/bin/python apps/fedidm/docs/grid_plot.py outputs/fedidm_grid apps/fedidm/results/grid.png
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np

from flowerbed.simulation.table import collect

ATTACKS = ("none", "sign-flip", "gaussian", "label-flip", "lie", "min-max", "min-sum", "ipm")


def main(folder: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in collect(folder):
        final = r["extra"].get("final", {})
        if "accuracy" in final:
            key = (r["config"]["method"], r["config"]["attack"])
            cells[key].append((final["accuracy"], final.get("acc_std_last10", 0.0)))
    methods = sorted({m for m, _ in cells}, key=lambda m: (m != "fedidm", m))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(len(ATTACKS))
    for i, m in enumerate(methods):
        acc = [np.mean([a for a, _ in cells[(m, k)]]) if cells[(m, k)] else np.nan for k in ATTACKS]
        std = [np.mean([s for _, s in cells[(m, k)]]) if cells[(m, k)] else 0.0 for k in ATTACKS]
        ax.bar(x + i * width - 0.4 + width / 2, acc, width, yerr=std, label=m, capsize=2)
    ax.set_xticks(x, ATTACKS)
    ax.set_ylabel("final test accuracy (bar: std over last 10 rounds)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"{len(cells)} cells -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
