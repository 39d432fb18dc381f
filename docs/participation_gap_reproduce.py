"""One command for the participation-gap table and plot across client counts (issue #16).

The plan below lists every (partition, number of clients, seeds) of the scale study: IID,
Flower's ``DirichletPartitioner``, the authors' equal-size ``label-dirichlet`` and the semantic
partitions (three embedders) at 20, 100 and 300 clients, all FedAvg on Fashion-MNIST with the
settings of ``docs/participation-gap-sweep.sh`` (MLP, 20 local steps of batch 32, lr 0.1, 20 %
of the clients never train, 80/20 train/validation, gap evaluation every 5 rounds).

The script finds the runs that already exist under ``outputs/multirun/fedavg`` (a
``results.json`` whose config matches the plan's settings, partition, seed, number of clients
and rounds; the newest one when a run exists twice), runs only the missing ones through
``docs/participation-gap-sweep.sh`` (one sweep command per partition and client count), then
writes the table (``docs/participation-gap-scale.md``) and the plot
(``docs/participation-gap-scale.png``)::

    .venv/bin/python docs/participation_gap_reproduce.py               # run what is missing, then table + plot
    .venv/bin/python docs/participation_gap_reproduce.py --plan        # list what is missing, run nothing
    .venv/bin/python docs/participation_gap_reproduce.py --table-only  # table + plot from the runs there

Per run, the numbers come from the per-client rows of the last gap round (``analyse`` of
``participation_gap_clients.py``: gap, label-mix part, residual at equal label mix, permutation
spread over which clients are held out; the permutation draws are seeded per run, so a run's
row does not depend on which other runs exist). Per partition: mean ± sample std over seeds (part-val accuracy and the out-of-sample gap,
train − validation on participating clients: means),
Student's t 95 % interval of the mean, how many seeds gave a gap > 0, and two tests of "no participation gap"
pooled over seeds (:func:`pooled_z`): ``perm z`` against the permutation spread, ``z``
against the standard error of each run's gap (:func:`welch_se`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
from participation_gap_clients import analyse, last_clients  # noqa: E402

#: the settings every run of the plan shares (those of docs/participation-gap-sweep.sh)
FIXED = {
    "dataset": "fashion_mnist",
    "model": "mlp",
    "local-steps": 20,
    "batch-size": 32,
    "lr": 0.1,
    "unparticipating-fraction": 0.2,
    "val-fraction": 0.2,
    "gap-eval-every": 5,
}
#: partitioners whose runs depend on ``alpha``
WITH_ALPHA = ("dirichlet", "label-dirichlet")
#: the sweep script's group for each partitioner
GROUP = {
    "iid": "iid",
    "dirichlet": "dir-low",
    "label-dirichlet": "label-dir",
    "semantic": "sem",
    "semantic-cnn": "sem-cnn",
    "semantic-pixels": "sem-pix",
}


def _seeds(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b + 1))


#: (partitioner, alpha or None, clients, rounds, seeds); the order is the table's
PLAN: tuple[tuple[str, float | None, int, int, tuple[int, ...]], ...] = (
    ("iid", None, 20, 15, _seeds(0, 7)),
    ("iid", None, 100, 15, _seeds(0, 2)),
    ("dirichlet", 100.0, 20, 15, _seeds(0, 7)),
    ("dirichlet", 0.5, 20, 15, _seeds(0, 7)),
    ("dirichlet", 0.5, 100, 15, _seeds(0, 2)),
    ("dirichlet", 0.1, 20, 15, _seeds(0, 7)),
    # seed 2 cannot be partitioned at 100 clients (no draw gives every client >= 10 examples)
    ("dirichlet", 0.1, 100, 15, (0, 1, 3)),
    ("label-dirichlet", 100.0, 100, 15, _seeds(0, 2)),
    ("label-dirichlet", 100.0, 300, 15, _seeds(0, 2)),
    ("label-dirichlet", 0.1, 20, 15, _seeds(0, 9)),
    ("label-dirichlet", 0.1, 100, 15, _seeds(0, 2)),
    ("label-dirichlet", 0.1, 300, 15, _seeds(0, 2)),
    ("semantic", None, 20, 15, _seeds(0, 13)),
    ("semantic", None, 100, 15, _seeds(0, 2)),
    ("semantic-cnn", None, 20, 15, _seeds(0, 2)),
    ("semantic-cnn", None, 100, 15, _seeds(0, 5)),
    ("semantic-cnn", None, 300, 15, _seeds(0, 2)),
    # longer training (3x the rounds): does a model that fits its clients more show a gap?
    ("semantic-cnn", None, 100, 45, _seeds(0, 2)),
    ("label-dirichlet", 100.0, 100, 45, _seeds(0, 1)),
    ("semantic-pixels", None, 20, 15, _seeds(0, 2)),
    ("semantic-pixels", None, 100, 15, _seeds(0, 2)),
)


def label(partitioner: str, alpha: float | None) -> str:
    return f"{partitioner} a={alpha:g}" if alpha is not None else partitioner


def run_key(res: dict) -> tuple | None:
    """``(partitioner, alpha, clients, rounds, seed)`` of a finished run with the plan's fixed
    settings, else None."""
    cfg, final = res.get("config", {}), res.get("extra", {}).get("final")
    if not final or "num_unpart_clients" not in final:
        return None
    if any(cfg.get(k) != v for k, v in FIXED.items()):
        return None
    name = str(cfg["partitioner"])
    alpha = float(cfg["alpha"]) if name in WITH_ALPHA else None
    clients = int(final["num_part_clients"]) + int(final["num_unpart_clients"])
    return name, alpha, clients, int(cfg["num-server-rounds"]), int(cfg["seed"])


def existing(root: Path) -> dict[tuple, Path]:
    """Every finished run under ``root`` by key (the newest sweep folder wins)."""
    found: dict[tuple, Path] = {}
    for path in sorted(root.glob("*/*/results.json")):  # sweep folders are timestamps
        try:
            key = run_key(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, ValueError):
            continue
        if key is not None:
            found[key] = path
    return found


def missing(found: dict[tuple, Path]) -> list[tuple[str, float | None, int, int, list[int]]]:
    out = []
    for name, alpha, clients, rounds, seeds in PLAN:
        todo = [s for s in seeds if (name, alpha, clients, rounds, s) not in found]
        if todo:
            out.append((name, alpha, clients, rounds, todo))
    return out


def sweep_command(name: str, alpha: float | None, clients: int, rounds: int, seeds: list[int]):
    """The environment and argv of the sweep script for one missing group."""
    env = {"CLIENTS": str(clients), "ROUNDS": str(rounds), "SEEDS": ",".join(map(str, seeds))}
    if alpha is not None:
        env["ALPHAS"] = f"{alpha:g}"
    return env, ["bash", "docs/participation-gap-sweep.sh", GROUP[name]]


def per_run(path: Path, draws: int) -> dict:
    res = json.loads(path.read_text())
    row = analyse(last_clients(res["rounds"]), draws, np.random.default_rng(res["config"]["seed"]))
    last = [r for r in res["rounds"] if r.get("gap_clients")][-1]
    row["se"] = welch_se(last["gap_clients"])
    row["oos"] = float(last["client_out_of_sample_gap_accuracy"])
    row["part-val"] = float(last["client_part_val_accuracy_mean"])
    row["commit"] = res.get("git_commit", "?")[:7]
    return row


def summarise(found: dict[tuple, Path], draws: int) -> list[dict]:
    """One row per plan entry with at least one finished run."""
    rows = []
    for name, alpha, clients, rounds, seeds in PLAN:
        runs = [
            per_run(found[(name, alpha, clients, rounds, s)], draws)
            for s in seeds
            if (name, alpha, clients, rounds, s) in found
        ]
        if runs:
            rows.append(
                {
                    "partition": label(name, alpha),
                    "clients": clients,
                    "rounds": rounds,
                    "runs": runs,
                }
            )
    return rows


def mean_ci(values: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, sample std, and the 95 % Student t-interval of the mean (nan with one value)."""
    from scipy import stats

    m = float(values.mean())
    if len(values) < 2:
        return m, float("nan"), float("nan"), float("nan")
    sd = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sd / np.sqrt(len(values))
    return m, sd, m - half, m + half


def welch_se(clients: list[dict]) -> float:
    """Standard error of one run's gap from the spread of the clients' accuracies in each group,
    ``sqrt(var(part-val) / N_part + var(unpart) / N_unpart)``. Unlike the permutation spread it
    keeps each group's own evaluation noise: with 300 clients a part-val slice has ~40
    examples and an unparticipating client ~200, so drawing "held-out" clients among part-val
    accuracies (the permutation) overstates the spread of the real gap."""
    pv = np.array([c["part_val_accuracy"] for c in clients if c["participating"]])
    un = np.array([c["unpart_accuracy"] for c in clients if not c["participating"]])
    return float(np.sqrt(pv.var(ddof=1) / len(pv) + un.var(ddof=1) / len(un)))


def pooled_z(runs: list[dict], sd: str) -> float:
    """The seeds' summed gap over its spread without a participation gap (each run's gap with
    sd ``run[sd]``, independent across seeds); ``|z| > 1.96`` ~ p < 0.05."""
    return float(sum(r["gap"] for r in runs) / np.sqrt(sum(r[sd] ** 2 for r in runs)))


def table(rows: list[dict]) -> str:
    head = (
        "| partition | clients | rounds | seeds | part-val acc | out-of-sample gap "
        "| participation gap (mean ± sd) | gap 95% CI | seeds > 0 "
        "| label-mix part | gap at equal label mix | perm sd | perm z | se | z | commits |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        gap = np.array([x["gap"] for x in r["runs"]])
        m, sd, lo, hi = mean_ci(gap)
        mix = np.array([x["label-mix"] for x in r["runs"]])
        res = np.array([x["residual"] for x in r["runs"]])
        perm = np.sqrt(np.mean([x["perm sd"] ** 2 for x in r["runs"]]))
        pz, z = pooled_z(r["runs"], "perm sd"), pooled_z(r["runs"], "se")
        se = np.sqrt(np.mean([x["se"] ** 2 for x in r["runs"]]))
        ci = "-" if np.isnan(lo) else f"[{lo:+.3f}, {hi:+.3f}]"
        sd_txt = "-" if np.isnan(sd) else f"{sd:.3f}"
        commits = ",".join(sorted({x["commit"] for x in r["runs"]}))
        lines.append(
            f"| {r['partition']} | {r['clients']} | {r['rounds']} | {len(gap)} "
            f"| {np.mean([x['part-val'] for x in r['runs']]):.3f} "
            f"| {np.mean([x['oos'] for x in r['runs']]):+.3f} "
            f"| {m:+.3f} ± {sd_txt} | {ci} | {int((gap > 0).sum())}/{len(gap)} "
            f"| {mix.mean():+.3f} | {res.mean():+.3f} | {perm:.3f} | {pz:+.2f} "
            f"| {se:.3f} | {z:+.2f} | {commits} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    """Participation gap (left) and its part at equal label mix (right) against the number of
    clients; a line per partition (mean, 95 % interval as error bar), dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_part: dict[str, list[dict]] = defaultdict(list)
    for r in rows:  # one series per partition and number of rounds
        extra = f", {r['rounds']} rounds" if r["rounds"] != 15 else ""
        by_part[r["partition"] + extra].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    names = list(by_part)
    for ax, key, title in (
        (axes[0], "gap", "participation gap (part-val − unpart accuracy)"),
        (axes[1], "residual", "gap at equal label mix (residual)"),
    ):
        for j, name in enumerate(names):
            shift = 1 + 0.045 * (j - (len(names) - 1) / 2)  # spread the series on a log axis
            xs, ms, errs = [], [], []
            for r in sorted(by_part[name], key=lambda r: r["clients"]):
                v = np.array([x[key] for x in r["runs"]])
                m, _, lo, _ = mean_ci(v)
                x = r["clients"] * shift
                xs.append(x)
                ms.append(m)
                errs.append(0.0 if np.isnan(lo) else m - lo)
                ax.plot(
                    [x] * len(v),
                    v,
                    ".",
                    color=plt.cm.tab20((2 * j) % 20 + (j // 10) % 2),
                    ms=3,
                    alpha=0.5,
                )
            style = (
                "-" if name.startswith("semantic") else "--"
            )  # semantic solid, label-based dashed
            ax.errorbar(
                xs,
                ms,
                yerr=errs,
                marker="o",
                ms=5,
                capsize=3,
                color=plt.cm.tab20((2 * j) % 20 + (j // 10) % 2),
                ls=style,
                label=name,
            )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks([20, 100, 300], ["20", "100", "300"])
        ax.minorticks_off()
        ax.set_xlim(15, 400)
        ax.set_xlabel("clients (20 % never train)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("accuracy gap, final round")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle("FedAvg, Fashion-MNIST: mean over seeds with 95 % t-interval; dots: seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "outputs" / "multirun" / "fedavg")
    ap.add_argument("--table-only", action="store_true", help="run nothing")
    ap.add_argument("--plan", action="store_true", help="print the missing runs, run nothing")
    ap.add_argument("--draws", type=int, default=5000, help="permutation draws per run")
    ap.add_argument("--table", type=Path, default=ROOT / "docs" / "participation-gap-scale.md")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "participation-gap-scale.png")
    args = ap.parse_args()

    todo = missing(existing(args.runs_dir))
    for name, alpha, clients, rounds, seeds in todo:
        env, argv = sweep_command(name, alpha, clients, rounds, seeds)
        line = " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(argv)
        if args.plan or args.table_only:
            print(f"missing: {line}", file=sys.stderr)
            continue
        print(f"[reproduce] {line}", file=sys.stderr, flush=True)
        subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, check=True)
    if args.plan:
        return
    rows = summarise(existing(args.runs_dir), args.draws)
    text = table(rows)
    args.table.write_text(
        "<!-- written by docs/participation_gap_reproduce.py; do not edit by hand -->\n"
        + text
        + "\n"
    )
    print(text)
    plot(rows, args.out)
    print(f"table -> {args.table}, plot -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
