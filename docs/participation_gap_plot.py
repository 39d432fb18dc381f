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
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

COLUMNS = (
    ("part_val_accuracy_mean", "part-val acc"),
    ("unpart_accuracy_mean", "unpart acc"),
    ("out_of_sample_gap_accuracy", "out-of-sample gap"),
    ("participation_gap_accuracy", "participation gap"),
)
#: example-weighted gap, shown in the table only (runs with per-client rows)
WEIGHTED = ("participation_gap_accuracy_weighted", "participation gap (weighted)")


def partition_name(config: dict) -> str:
    """``dirichlet a=0.1`` for a Dirichlet run, else the partitioner's name."""
    name = str(config["partitioner"])
    return f"{name} a={config['alpha']}" if name in ("dirichlet", "label-dirichlet") else name


def last_gap_row(rounds: list[dict]) -> dict:
    """The last round that carries the gap evaluation (it runs every ``gap-eval-every``)."""
    rows = [r for r in rounds if "client_participation_gap_accuracy" in r]
    if not rows:
        raise ValueError("no round with a gap evaluation in results.json")
    return rows[-1]


def collect(folders: list[Path]) -> dict[str, dict[str, list[float]]]:
    """Per partition, per column: the values of every seed (finished runs only); with the
    per-client rows, also the gap left at equal label mix (``residual``, see
    ``participation_gap_clients.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from participation_gap_clients import analyse, last_clients

    rng = np.random.default_rng(0)
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for folder in folders:
        for path in sorted(folder.glob("*/results.json")):
            res = json.loads(path.read_text())
            if "final" not in res.get("extra", {}):
                continue  # still running
            row = last_gap_row(res["rounds"])
            name = partition_name(res["config"])
            if row["client_num_part_clients"] + row["client_num_unpart_clients"] != 20:
                name += f" /{row['client_num_part_clients'] + row['client_num_unpart_clients']}"
            group = out[name]
            for key, _ in (*COLUMNS, WEIGHTED):
                if f"client_{key}" in row:
                    group[key].append(float(row[f"client_{key}"]))
            if "gap_clients" in row:
                group["residual"].append(analyse(last_clients(res["rounds"]), 2, rng)["residual"])
            group["commit"].append(res.get("git_commit", "?")[:7])
    return out


def table(data: dict[str, dict[str, list[float]]]) -> str:
    """Markdown table: mean ± std over seeds (sample std, ddof=1, as in the runner's
    summary.md), the 95 % t-interval of the participation gap over seeds, the weighted gap and
    the gap at equal label mix where the runs have per-client rows."""
    from scipy import stats

    cols = [*COLUMNS, WEIGHTED, ("residual", "gap at equal label mix")]
    head = "| partition | " + " | ".join(c for _, c in cols) + " | gap 95% CI | seeds | commit |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]

    def cell(v):
        if len(v) < 2:
            return f"{np.mean(v):.4f}" if v else "-"
        return f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}"

    for name in sorted(data):
        g = data[name]
        cells = [cell(g.get(k, [])) for k, _ in cols]
        gap = np.array(g["participation_gap_accuracy"])
        ci = "-"
        if len(gap) > 1:
            half = stats.t.ppf(0.975, len(gap) - 1) * gap.std(ddof=1) / np.sqrt(len(gap))
            ci = f"[{gap.mean() - half:+.3f}, {gap.mean() + half:+.3f}]"
        commits = ",".join(sorted(set(g["commit"])))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ci} | {len(gap)} | {commits} |")
    return "\n".join(lines)


def plot(data: dict[str, dict[str, list[float]]], out: Path) -> None:
    """Both gaps per partition: bars = mean over seeds, dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(data)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bars = [*COLUMNS[2:], ("residual", "participation gap at equal label mix")]
    bars = [(k, lab) for k, lab in bars if all(data[n].get(k) for n in names)]
    width = 0.8 / len(bars)
    for j, (key, label) in enumerate(bars):
        off = (j - (len(bars) - 1) / 2) * width
        means = [np.mean(data[n][key]) for n in names]
        ax.bar(x + off, means, width=width * 0.95, label=label)
        for i, n in enumerate(names):
            ax.plot([x[i] + off] * len(data[n][key]), data[n][key], "k.", ms=4)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [n.replace(" ", "\n") for n in names])
    ax.set_ylabel("accuracy gap")
    ax.set_title("FedAvg, Fashion-MNIST, 20 clients (4 never train), final round; dots: seeds")
    ax.legend(fontsize=8)
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
