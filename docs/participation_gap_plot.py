"""Table and plot of the participation-gap demo sweep (issue #16).

Reads every ``results.json`` under the given sweep folders (``outputs/multirun/fedavg/<time>``,
written by ``docs/participation-gap-sweep.sh``), groups the runs by partition (``iid``,
``semantic`` or ``dirichlet a=<alpha>``) and prints a Markdown table of the final-round
participating-validation and unparticipating accuracy, the out-of-sample gap and the
participation gap (mean ± std over seeds), then draws the two gaps per partition with the
seeds as points::

    .venv/bin/python docs/participation_gap_plot.py outputs/multirun/fedavg/<t1> ... \\
        --out docs/participation-gap.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

COLUMNS = (
    ("part_val_accuracy_mean", "part-val acc"),
    ("unpart_accuracy_mean", "unpart acc"),
    ("out_of_sample_gap_accuracy", "out-of-sample gap"),
    ("participation_gap_accuracy", "participation gap"),
)


def partition_name(config: dict) -> str:
    """``dirichlet a=0.1`` for a Dirichlet run, else the partitioner's name."""
    name = str(config["partitioner"])
    return f"{name} a={config['alpha']}" if name == "dirichlet" else name


def last_gap_row(rounds: list[dict]) -> dict:
    """The last round that carries the gap evaluation (it runs every ``gap-eval-every``)."""
    rows = [r for r in rounds if "client_participation_gap_accuracy" in r]
    if not rows:
        raise ValueError("no round with a gap evaluation in results.json")
    return rows[-1]


def collect(folders: list[Path]) -> dict[str, dict[str, list[float]]]:
    """Per partition, per column: the values of every seed."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for folder in folders:
        for path in sorted(folder.glob("*/results.json")):
            res = json.loads(path.read_text())
            row = last_gap_row(res["rounds"])
            group = out[partition_name(res["config"])]
            for key, _ in COLUMNS:
                group[key].append(float(row[f"client_{key}"]))
            group["commit"].append(res.get("git_commit", "?")[:7])
    return out


def table(data: dict[str, dict[str, list[float]]]) -> str:
    """Markdown table: mean ± std over seeds (sample std, ddof=1, as in the runner's summary.md)."""
    head = "| partition | " + " | ".join(c for _, c in COLUMNS) + " | seeds | commit |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for name in sorted(data):
        g = data[name]
        cells = [f"{np.mean(g[k]):.4f} ± {np.std(g[k], ddof=1):.4f}" for k, _ in COLUMNS]
        commits = ",".join(sorted(set(g["commit"])))
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {len(g[COLUMNS[0][0]])} | {commits} |"
        )
    return "\n".join(lines)


def plot(data: dict[str, dict[str, list[float]]], out: Path) -> None:
    """Both gaps per partition: bars = mean over seeds, dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(data)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for j, (key, label) in enumerate(COLUMNS[2:]):
        means = [np.mean(data[n][key]) for n in names]
        ax.bar(x + (j - 0.5) * 0.38, means, width=0.36, label=label)
        for i, n in enumerate(names):
            ax.plot([x[i] + (j - 0.5) * 0.38] * len(data[n][key]), data[n][key], "k.", ms=4)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [n.replace(" ", "\n") for n in names])
    ax.set_ylabel("accuracy gap")
    ax.set_title("FedAvg, Fashion-MNIST, 20 clients (4 never train), final round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/participation-gap.png"))
    args = ap.parse_args()
    data = collect(args.folders)
    print(table(data))
    plot(data, args.out)
    print(f"plot -> {args.out}")


if __name__ == "__main__":
    main()
