"""Why projection does or does not help: tables from the runs of ``projection_runs.sh``.

For each setting (``three``: 3 clients, one per task; ``six``: 6 clients, two per task) and each
split method (mean ± sample std over seeds; every step of every round pooled within a run):

1. final task metrics, the conflict rate and the size of PCGrad's change to the step
   (``pc_change = ||PCGrad mean - plain mean|| / ||plain mean||``, ``pc_cos`` = cosine between
   them, ``cancel = ||plain mean|| / mean_k ||g_k||``);
2. the distribution of the pairwise cosines of the clients' gradients of G, by pair type
   (same task / different tasks, and each task pair): mean, 10/50/90 % quantiles, share < 0;
3. each task's gradient norm ``||g_k||`` (mean over steps) and its share of the sum;
4. the step diagnostics of 1. per round;
5. each seed's final metrics minus split-avg's of the same seed (paired).

    .venv/bin/python apps/fedbone/docs/projection.py outputs/fedbone_projection
"""

import glob
import json
import os
import sys
from collections import defaultdict

import numpy as np

METHODS = ["split-avg", "split-pcgrad", "fedbone"]
KEYS = ("conflict_rate_steps", "pc_change_steps", "pc_cos_steps", "cancel_steps")
FINAL = [("cls_accuracy", "{:.4f}"), ("denoise_psnr", "{:.2f}"), ("seg_iou", "{:.4f}")]


def ms(v, fmt="{:.3f}"):
    if not v:
        return "–"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(np.mean(v))} ± {fmt.format(np.std(v, ddof=1))}"


def table(title, cols):
    """A markdown table's title and header."""
    print(f"\n## {title}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))


def load(root):
    runs = defaultdict(list)  # (setting, method) -> [results]
    for p in sorted(glob.glob(f"{root}/*/*/*/results.json")):
        setting = p.split(os.sep)[-4]
        r = json.load(open(p))
        runs[(setting, r["config"]["method"])].append(r)
    return runs


def steps(r, key):
    return [v for row in r["rounds"] if key in row for v in row[key]]


def pairs(r):
    """(pair type, cosine) of every pair of every step."""
    out = []
    for row in r["rounds"]:
        if "cos_steps" not in row:
            continue
        kinds = ["|".join(sorted(p.split("|"))) for p in row["pair_tasks"]]
        for cs in row["cos_steps"]:
            out += list(zip(kinds, cs, strict=True))
    return out


def main(root):
    runs = load(root)
    settings = sorted({s for s, _ in runs}, key=lambda s: ["three", "six"].index(s))
    commits = sorted({r["git_commit"][:7] for rs in runs.values() for r in rs})
    table(
        "1. Final metrics and the size of the projection's change (per run: mean over steps)",
        [
            "setting",
            "method",
            "seeds",
            "accuracy (cls)",
            "PSNR (denoise)",
            "IoU (seg)",
            "conflict rate",
            "pc_change",
            "pc_cos",
            "cancel",
        ],
    )
    for s in settings:
        for m in METHODS:
            rs = runs.get((s, m), [])
            if not rs:
                continue
            cells = [ms([r["extra"]["final"][k] for r in rs], f) for k, f in FINAL]
            for key in KEYS:
                cells.append(ms([float(np.mean(steps(r, key))) for r in rs]))
            print(f"| {s} | {m} | {len(rs)} | " + " | ".join(cells) + " |")
    table(
        "2. Pairwise cosines of the clients' gradients of G (all steps, all methods, all seeds)",
        ["setting", "pair type", "pairs x steps", "mean cos", "10%", "50%", "90%", "share < 0"],
    )
    for s in settings:
        allp = [p for m in METHODS for r in runs.get((s, m), []) for p in pairs(r)]
        groups = defaultdict(list)
        for kind, c in allp:
            a, b = kind.split("|")
            groups["same task" if a == b else "different tasks"].append(c)
            groups[kind].append(c)
        order = ["same task", "different tasks"] + sorted(k for k in groups if "|" in k)
        for k in order:
            v = np.array(groups.get(k, []))
            if not len(v):
                continue
            q = np.quantile(v, [0.1, 0.5, 0.9])
            print(
                f"| {s} | {k} | {len(v)} | {v.mean():.3f} | {q[0]:.3f} | {q[1]:.3f} | {q[2]:.3f}"
                f" | {(v < 0).mean():.3f} |"
            )
    table(
        "3. Gradient norm of each task's clients (mean over steps, all methods, all seeds)",
        ["setting", "task", "mean ‖g_k‖", "share of the sum of norms"],
    )
    for s in settings:
        norms = defaultdict(list)
        for m in METHODS:
            for r in runs.get((s, m), []):
                for row in r["rounds"]:
                    for ns in row.get("grad_norm_steps", []):
                        for t, n in zip(row["grad_tasks"], ns, strict=True):
                            norms[t].append(n)
        total = sum(np.mean(v) for v in norms.values())
        for t in sorted(norms):
            print(f"| {s} | {t} | {np.mean(norms[t]):.4f} | {np.mean(norms[t]) / total:.2f} |")
    table(
        "4. Per round (mean over steps; all methods, all seeds)",
        ["setting", "round", "conflict rate", "pc_change", "pc_cos", "cancel"],
    )
    for s in settings:
        by_round = defaultdict(lambda: defaultdict(list))
        for m in METHODS:
            for r in runs.get((s, m), []):
                for row in r["rounds"]:
                    for key in KEYS:
                        by_round[row["round"]][key] += row.get(key, [])
        for rnd in sorted(k for k in by_round if by_round[k]["pc_change_steps"]):
            cells = [f"{np.mean(by_round[rnd][key]):.3f}" for key in KEYS]
            print(f"| {s} | {rnd} | " + " | ".join(cells) + " |")
    table(
        "5. Paired differences to split-avg (same seed: same initial G, parts and batches)",
        ["setting", "method", "seed", "Δ accuracy (cls)", "Δ PSNR (denoise)", "Δ IoU (seg)"],
    )
    for s in settings:
        base = {r["config"]["seed"]: r["extra"]["final"] for r in runs.get((s, "split-avg"), [])}
        for m in METHODS[1:]:
            for r in sorted(runs.get((s, m), []), key=lambda r: r["config"]["seed"]):
                seed, fin = r["config"]["seed"], r["extra"]["final"]
                if seed not in base:
                    continue
                d = [fin[k] - base[seed][k] for k, _ in FINAL]
                print(f"| {s} | {m} | {seed} | {d[0]:+.4f} | {d[1]:+.2f} | {d[2]:+.4f} |")
    print("\ncommits:", ", ".join(commits))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/fedbone_projection")
