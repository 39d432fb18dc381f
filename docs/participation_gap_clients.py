"""Per-client analysis of the participation gap (issue #16): is a gap noise of *which* clients
were held out, or does it come from the clients' label mix, or from something the label mix does
not explain?

Reads the per-client rows (``gap_clients``, written by
:class:`flowerbed.common.participation.Participation` in every gap-evaluation round) of the last
gap round of every ``results.json`` under the given folders, and prints per run and per
partition (mean ± std over seeds, with a 95 % t-interval):

``gap``
    the participation gap as reported (unweighted mean over clients of part-val accuracy minus
    that of the unparticipating clients).
``wgap``
    the same with example-weighted means (pooled accuracy; the authors' code logs both).
``perm sd`` / ``perm p``
    a permutation test over which clients are held out: every client's accuracy on data it did
    not train on (part-val for a participating client, all its data for an unparticipating one)
    is kept, and ``k`` of the ``N`` clients (``k`` = the number held out) are drawn at random
    as the "unparticipating" group, ``--draws`` times (seeded by ``--seed``). ``perm sd`` is
    the spread of the gap that the choice of held-out clients alone gives; ``perm p`` the
    two-sided share of draws at least as far from 0 as the observed gap.
``label-mix``
    the part of the gap the label mix explains: per-class accuracy ``acc_k`` pooled over the
    participating clients' validation data, each client's expected accuracy
    ``e_i = sum_k n_ik acc_k / n_i`` from its own label counts, and ``mean(e, participating) -
    mean(e, unparticipating)``.
``residual``
    ``gap - label-mix``: the gap at equal label mix (class-conditional). On label-based
    partitions every client draws ``x`` from the same ``p(x | y)``, so this should be ~0; on
    semantic partitions clients differ in ``p(x | y)`` and it should be > 0.
``corr``
    the correlation over classes between ``acc_k`` and the class's share of the data the
    participating clients trained on (> 0: the classes the held-out clients took away are the
    ones the model gets wrong).
``H part`` / ``H unpart``
    mean label entropy (bits) of the participating clients' validation slices / of the
    unparticipating clients' data.

Usage::

    .venv/bin/python docs/participation_gap_clients.py outputs/multirun/fedavg/<t1> ... \\
        [--runs] [--draws 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats


def partition_name(config: dict) -> str:
    """``dirichlet a=0.1`` for a Dirichlet run, else the partitioner's name; ``/N`` clients
    when not 20."""
    name = str(config["partitioner"])
    if name in ("dirichlet", "label-dirichlet"):
        name = f"{name} a={config['alpha']}"
    return name


def last_clients(rounds: list[dict]) -> list[dict]:
    """The per-client rows of the last gap-evaluation round."""
    rows = [r["gap_clients"] for r in rounds if r.get("gap_clients")]
    if not rows:
        raise ValueError("no gap_clients in results.json (run before per-client rows?)")
    return rows[-1]


def held_out_accuracy(c: dict) -> float:
    """A client's accuracy on data it did not train on."""
    return c["part_val_accuracy"] if c["participating"] else c["unpart_accuracy"]


def analyse(clients: list[dict], draws: int, rng: np.random.Generator) -> dict[str, float]:
    """The numbers of the module docstring for one run."""
    part = [c for c in clients if c["participating"]]
    unpart = [c for c in clients if not c["participating"]]
    acc = np.array([held_out_accuracy(c) for c in clients])
    is_unpart = np.array([not c["participating"] for c in clients])
    gap = acc[~is_unpart].mean() - acc[is_unpart].mean()

    def pooled(rows, split):
        hits = sum(np.array(c[f"{split}_class_correct"]) for c in rows)
        return hits.sum() / sum(c[f"{split}_num_examples"] for c in rows)

    wgap = pooled(part, "part_val") - pooled(unpart, "unpart")

    k, n = int(is_unpart.sum()), len(acc)
    perm = np.empty(draws)
    for b in range(draws):
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, size=k, replace=False)] = True
        perm[b] = acc[~mask].mean() - acc[mask].mean()
    p = float((np.abs(perm) >= abs(gap) - 1e-12).mean())

    hits = sum(np.array(c["part_val_class_correct"]) for c in part)
    counts = sum(np.array(c["part_val_label_counts"]) for c in part)
    acc_k = np.divide(hits, counts, out=np.zeros(len(counts)), where=counts > 0)

    def expected(c):
        split = "part_val" if c["participating"] else "unpart"
        lc = np.array(c[f"{split}_label_counts"])
        return float(lc @ acc_k / lc.sum())

    train = sum(np.array(c["part_train_label_counts"]) for c in part)
    share = train / train.sum()  # each class's share of the data that was trained on
    corr = float(np.corrcoef(acc_k, share)[0, 1]) if np.std(share) > 0 else 0.0
    e = np.array([expected(c) for c in clients])
    mix = e[~is_unpart].mean() - e[is_unpart].mean()
    entropy = {
        "H part": np.mean([c["part_val_label_entropy"] for c in part]),
        "H unpart": np.mean([c["unpart_label_entropy"] for c in unpart]),
    }
    return {
        "gap": gap,
        "wgap": wgap,
        "perm sd": float(perm.std(ddof=1)),
        "perm p": p,
        "label-mix": mix,
        "residual": gap - mix,
        "corr": corr,
        **entropy,
        "clients": n,
    }


def collect(folders: list[Path], draws: int, seed: int):
    """Per partition: the analysed runs (with their seed and commit)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[dict]] = defaultdict(list)
    for folder in folders:
        paths = (
            [folder] if folder.name == "results.json" else sorted(folder.glob("**/results.json"))
        )
        for path in paths:
            res = json.loads(path.read_text())
            if "final" not in res.get("extra", {}):  # a run still going (or one that failed)
                print(f"skipped (not finished): {path}", file=sys.stderr)
                continue
            cfg = res["config"]
            row = analyse(last_clients(res["rounds"]), draws, rng)
            name = partition_name(cfg)
            if row["clients"] != 20:
                name += f" /{row['clients']}"
            row.update(seed=cfg["seed"], commit=res.get("git_commit", "?")[:7])
            out[name].append(row)
    return out


COLS = ("gap", "wgap", "perm sd", "perm p", "label-mix", "residual", "corr", "H part", "H unpart")


def run_table(data) -> str:
    lines = ["| partition | seed | " + " | ".join(COLS) + " | commit |"]
    lines.append("|" + "---|" * (len(COLS) + 3))
    for name in sorted(data):
        for r in sorted(data[name], key=lambda r: r["seed"]):
            cells = " | ".join(f"{r[c]:+.3f}" if c != "perm p" else f"{r[c]:.3f}" for c in COLS)
            lines.append(f"| {name} | {r['seed']} | {cells} | {r['commit']} |")
    return "\n".join(lines)


def summary_table(data) -> str:
    """Mean ± std over seeds; 95 % t-interval of the gap over seeds; the seeds' std next to
    the permutation sd (noise of the held-out choice within one run)."""
    cols = ("gap", "wgap", "label-mix", "residual")
    head = "| partition | seeds | " + " | ".join(cols)
    lines = [head + " | gap 95% CI (t, seeds) | seed sd / perm sd | commits |"]
    lines.append("|" + "---|" * (len(cols) + 5))
    for name in sorted(data):
        rows = data[name]
        cells = []
        for c in cols:
            v = np.array([r[c] for r in rows])
            sd = v.std(ddof=1) if len(v) > 1 else float("nan")
            cells.append(f"{v.mean():+.3f} ± {sd:.3f}")
        g = np.array([r["gap"] for r in rows])
        if len(g) > 1:
            half = stats.t.ppf(0.975, len(g) - 1) * g.std(ddof=1) / np.sqrt(len(g))
            ci = f"[{g.mean() - half:+.3f}, {g.mean() + half:+.3f}]"
            ratio = (
                f"{g.std(ddof=1):.3f} / {np.sqrt(np.mean([r['perm sd'] ** 2 for r in rows])):.3f}"
            )
        else:
            ci, ratio = "-", f"- / {rows[0]['perm sd']:.3f}"
        commits = ",".join(sorted({r["commit"] for r in rows}))
        lines.append(
            f"| {name} | {len(rows)} | " + " | ".join(cells) + f" | {ci} | {ratio} | {commits} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--draws", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", action="store_true", help="also print one row per run")
    args = ap.parse_args()
    data = collect(args.folders, args.draws, args.seed)
    if args.runs:
        print(run_table(data))
        print()
    print(summary_table(data))


if __name__ == "__main__":
    main()
