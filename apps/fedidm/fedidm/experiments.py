"""One command for the grid of issue #15: every method x attack at 20 / 30 / 40 % malicious,
3 seeds, then the README's tables and plots.

    python -m fedidm.experiments --dry-run             # the cells found, the runs still missing
    python -m fedidm.experiments                       # run the missing cells, then the tables
    python -m fedidm.experiments --only 30 --jobs 2 --wrap /work/bin/cpu-slot
    python -m fedidm.experiments --skip-runs           # tables and plots of what exists

The grid (:func:`cells`): 8 methods x (no attack + 7 attacks) x fractions 0.2 / 0.3 / 0.4 x
seeds 0-2, Fashion-MNIST, 20 clients, Dirichlet alpha 0.5, 10 rounds, every other key at the
app's default. A run without attack does not depend on the fraction (Krum, MultiKrum and Bulyan
get f = 0 when ``attack=none``), so the ``none`` cell of a (method, seed) is shared by the three
fractions: 24 + 504 cells.

A cell is **found** (and never re-run) when a ``results.json`` of the ``fedidm`` app below
``--search`` (default: the repository's ``outputs``) has a finished run whose config matches
it: method, attack, attack fraction (not for ``none``), seed, and every other key of the app's
schema equal to the grid's value (a key the run does not record counts as its default, for
runs made before the key existed), and 20 clients (the nodes sent the train message). A cell
found twice uses the later path (sorted), as the other ``docs/`` scripts do.

The missing cells are run with the Hydra runner (``flowerbed-run -m``), one command per seed,
fraction and a small group of methods x attacks (at most ``--budget`` estimated seconds: FedIDM
~130 s per run, a baseline ~20 s), into ``OUT/fedidm_exp/f<pct>/s<seed>_<hash>``; ``--wrap``
prefixes each command (e.g. a CPU-slot wrapper), ``--jobs`` runs that many at once. Each run
prints the runner's progress.

Outputs (``--results``, default ``apps/fedidm/results``): per fraction ``grid_<pct>pct.md``
(mean +- std over seeds of final accuracy, ``acc_std_last10``, detection precision / recall;
then the final accuracy per seed and the gap to the method's no-attack run of the same seed,
bold beyond -3 points) and ``grid_<pct>pct.png`` (bars: mean final accuracy over seeds; error
bar: mean ``acc_std_last10``); ``detection.md`` (FedIDM and FLTrust, every fraction: mean of
the per-run precision / recall and the counts pooled over rounds and seeds).
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fedidm.methods import METHODS as TABLE
from flowerbed.common.results import git_commit
from flowerbed.simulation.table import collect, mean_std

ROOT = Path(__file__).resolve().parents[3]
APP = "fedidm"
METHODS = TABLE.names  # every row of the method table
#: the shared suite's attacks (common.attacks.ATTACKS but none), in the README's order
ATTACKS = ("sign-flip", "gaussian", "label-flip", "lie", "min-max", "min-sum", "ipm")
FRACTIONS = (0.2, 0.3, 0.4)
SEEDS = (0, 1, 2)
CLIENTS = 20
#: the grid's setting on top of the app's defaults (pyproject = schema defaults)
SETTING: dict[str, Any] = {"num-server-rounds": 10, "alpha": 0.5}
#: the axes of the grid: not compared with the setting
AXES = ("method", "attack", "attack-fraction", "seed", "results-dir")
#: keys read by one method only: not compared for the other methods' runs (e.g. the FedAvg
#: runs of the first 30 % grid recorded ``finetune=false``, which FedAvg never reads)
OWN_KEYS = {
    "fedidm": (
        "ipc",
        "dm-steps",
        "dm-lr",
        "dm-embed-dim",
        "server-steps",
        "tau-cos",
        "mad-c",
        "clip",
        "fallback",
        "rectify",
        "finetune",
        "finetune-from",
    ),
    "fltrust": ("root-size",),
    "fedtrimmedavg": ("trim-beta",),
}
#: estimated seconds per run on the shared 2-core machine (for grouping only)
SECONDS = {"fedidm": 130.0}
BASELINE_SECONDS = 20.0
DETECTING = ("fedidm", "fltrust")
NONE_FRACTION = 0.3  # what a no-attack run is given (unused by it)

Cell = tuple[str, str, float | None, int]  # (method, attack, fraction or None for none, seed)


def cells(
    fractions=FRACTIONS, methods=METHODS, attacks=("none", *ATTACKS), seeds=SEEDS
) -> list[Cell]:
    """Every cell of the grid (the ``none`` cells once per method and seed)."""
    out: list[Cell] = []
    for m in methods:
        for s in seeds:
            if "none" in attacks:
                out.append((m, "none", None, s))
            for f in fractions:
                out += [(m, a, f, s) for a in attacks if a != "none"]
    return out


def setting() -> dict[str, Any]:
    """The run config every grid run shares (the axes excluded)."""
    from fedidm.task import SCHEMA

    ref = {k: opt.default for k, opt in SCHEMA.items() if k not in AXES}
    ref.update(SETTING)
    return ref


def num_clients(run: dict) -> int:
    """Nodes sent the train message (the most in any round)."""
    sent = [r.get("phases", {}).get("train", {}).get("num_sent", 0) for r in run["rounds"]]
    return max(sent, default=0)


def cell_of(run: dict, ref: dict[str, Any]) -> Cell | None:
    """The grid cell a finished run fills, or None (other app, setting or size; unfinished)."""
    c = run.get("config", {})
    if run.get("app") != APP or "accuracy" not in run.get("extra", {}).get("final", {}):
        return None
    method = c.get("method")
    other = {k for m, keys in OWN_KEYS.items() if m != method for k in keys}
    if any(c.get(k, v) != v for k, v in ref.items() if k not in other):  # unrecorded: default
        return None
    if num_clients(run) != CLIENTS:
        return None
    frac = None if c["attack"] == "none" else round(float(c["attack-fraction"]), 6)
    return (c["method"], c["attack"], frac, int(c["seed"]))


def find(folders: list[Path]) -> tuple[dict[Cell, dict], list[Cell]]:
    """(cell -> run, cells found more than once) of every results.json below ``folders``."""
    ref = setting()
    found: dict[Cell, dict] = {}
    twice: list[Cell] = []
    for folder in folders:
        for run in collect(folder):
            cell = cell_of(run, ref)
            if cell is None:
                continue
            if cell in found:
                twice.append(cell)
            found[cell] = run  # sorted paths: the later one kept
    return found, twice


def seconds(method: str) -> float:
    return SECONDS.get(method, BASELINE_SECONDS)


def groups(
    missing: list[Cell], budget: float = 480.0
) -> list[tuple[tuple[str, ...], tuple[str, ...], float | None, int]]:
    """The missing cells as runner sweeps ``(methods, attacks, fraction, seed)``: a product of
    methods x attacks at one fraction and seed, at most ``budget`` estimated seconds each
    (a single run over budget is its own group)."""
    by: dict[tuple, set[str]] = defaultdict(set)
    for m, a, f, s in missing:
        by[(f, s, m)].add(a)
    merged: dict[tuple, list[str]] = defaultdict(list)  # (fraction, seed, attacks) -> methods
    for (f, s, m), atts in by.items():
        order = tuple(a for a in ("none", *ATTACKS) if a in atts)
        merged[(f, s, order)].append(m)
    out = []
    for (f, s, atts), ms in sorted(
        merged.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1], kv[0][2])
    ):
        ms = [m for m in METHODS if m in ms]
        for kind in ([m for m in ms if m in SECONDS], [m for m in ms if m not in SECONDS]):
            if not kind:
                continue
            per = max(seconds(m) for m in kind)
            n_att = max(1, min(len(atts), int(budget // per)))
            for i in range(0, len(atts), n_att):
                a_chunk = atts[i : i + n_att]
                n_m = max(1, int(budget // (per * len(a_chunk))))
                for j in range(0, len(kind), n_m):
                    out.append((tuple(kind[j : j + n_m]), a_chunk, f, s))
    return out


def folder(out: Path, methods, attacks, fraction: float | None, seed: int) -> Path:
    """Where one sweep writes: ``OUT/fedidm_exp/f<pct>/s<seed>_<hash of methods, attacks>``."""
    tag = hashlib.sha1(f"{','.join(methods)}|{','.join(attacks)}".encode()).hexdigest()[:8]
    sub = "none" if fraction is None else f"f{round(100 * fraction)}"
    return out / "fedidm_exp" / sub / f"s{seed}_{tag}"


def command(out: Path, methods, attacks, fraction: float | None, seed: int) -> list[str]:
    """The runner command of one sweep (a Hydra multirun)."""
    frac = NONE_FRACTION if fraction is None else fraction
    return [
        sys.executable,
        "-m",
        "flowerbed.simulation.runner",
        "-m",
        f"app={APP}",
        "launcher=local",
        f"++run_config.method={','.join(methods)}",
        f"++run_config.attack={','.join(attacks)}",
        f"++run_config.attack-fraction={frac}",
        *(f"++run_config.{k}={v}" for k, v in SETTING.items()),
        f"seed={seed}",
        f"hydra.sweep.dir={folder(out, methods, attacks, fraction, seed)}",
    ]


def plan(
    found: dict[Cell, dict],
    out: Path,
    fractions=FRACTIONS,
    methods=METHODS,
    attacks=("none", *ATTACKS),
    seeds=SEEDS,
    budget: float = 480.0,
) -> tuple[list[Cell], list[list[str]]]:
    """(the selected cells not found, the runner commands that fill them)."""
    missing = [c for c in cells(fractions, methods, attacks, seeds) if c not in found]
    return missing, [command(out, *g) for g in groups(missing, budget)]


# --------------------------------------------------------------------------- tables and plots


def _fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.4f} ± {ms[1]:.4f}"


def metrics_table(found: dict[Cell, dict], fraction: float) -> list[str]:
    """Mean ± std over seeds of final accuracy, acc_std_last10, detection P / R, per cell."""
    out = [
        "| method | attack | accuracy | acc_std_last10 | detect_precision | detect_recall | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        for a in ("none", *ATTACKS):
            runs = _runs(found, m, a, fraction)
            if not runs:
                out.append(f"| {m} | {a} | – | – | – | – | 0 |")
                continue
            finals = [r["extra"]["final"] for r in runs.values()]
            vals = []
            for k in ("accuracy", "acc_std_last10", "detect_precision", "detect_recall"):
                got = [f[k] for f in finals if k in f]
                vals.append(_fmt(mean_std(got)) if got else "–")
            seeds = ",".join(map(str, sorted(runs)))
            out.append(f"| {m} | {a} | {' | '.join(vals)} | {len(runs)} ({seeds}) |")
    return out


def _runs(found, method: str, attack: str, fraction: float) -> dict[int, dict]:
    frac = None if attack == "none" else fraction
    return {
        s: found[(method, attack, frac, s)] for s in SEEDS if (method, attack, frac, s) in found
    }


def _acc(run: dict) -> float:
    return float(run["extra"]["final"]["accuracy"])


def gap_table(found: dict[Cell, dict], fraction: float, methods=METHODS) -> list[str]:
    """Final accuracy per seed and the gap (points) to the no-attack run of the same seed."""
    head = " | ".join(f"seed {s}" for s in SEEDS)
    out = [
        f"| method | attack | {head} | mean ± std | gap to no attack per seed (points) | mean gap |",
        "|---|---|" + "---|" * len(SEEDS) + "---|---|---|",
    ]
    for m in methods:
        clean = {s: _acc(r) for s, r in _runs(found, m, "none", fraction).items()}
        out.append(
            f"| {m} | none | "
            + " | ".join(f"{clean[s]:.4f}" if s in clean else "–" for s in SEEDS)
            + (f" | {_fmt(mean_std(list(clean.values())))} | | |" if clean else " | – | | |")
        )
        for a in ATTACKS:
            per = {s: _acc(r) for s, r in _runs(found, m, a, fraction).items()}
            if not per:
                continue
            gaps = [100 * (per[s] - clean[s]) for s in sorted(per) if s in clean]
            flag = " / ".join(f"**{g:+.1f}**" if g < -3 else f"{g:+.1f}" for g in gaps) or "–"
            mean_gap = f"{np.mean(gaps):+.1f}" if gaps else "–"
            if gaps and np.mean(gaps) < -3:
                mean_gap = f"**{mean_gap}**"
            out.append(
                f"| {m} | {a} | "
                + " | ".join(f"{per[s]:.4f}" if s in per else "–" for s in SEEDS)
                + f" | {_fmt(mean_std(list(per.values())))} | {flag} | {mean_gap} |"
            )
    return out


def matrix_table(found: dict[Cell, dict], fraction: float) -> list[str]:
    """Method x attack: mean final accuracy over seeds, the mean gap to the method's no-attack
    run in points (bold below -3), and the number of seeds when not 3."""
    out = [
        "| method | " + " | ".join(("none", *ATTACKS)) + " |",
        "|---|" + "---|" * (1 + len(ATTACKS)),
    ]
    for m in METHODS:
        clean = {s: _acc(r) for s, r in _runs(found, m, "none", fraction).items()}
        row = [f"{np.mean(list(clean.values())):.3f}" if clean else "–"]
        for a in ATTACKS:
            per = {s: _acc(r) for s, r in _runs(found, m, a, fraction).items()}
            if not per:
                row.append("–")
                continue
            gaps = [100 * (per[s] - clean[s]) for s in per if s in clean]
            cell = f"{np.mean(list(per.values())):.3f}"
            if gaps:
                g = f"{np.mean(gaps):+.1f}"
                cell += f" ({'**' + g + '**' if np.mean(gaps) < -3 else g})"
            if len(per) != len(SEEDS):
                cell += f" [{len(per)} seed{'s' if len(per) > 1 else ''}]"
            row.append(cell)
        out.append(f"| {m} | " + " | ".join(row) + " |")
    return out


def detection_row(by_seed: dict[int, dict]) -> dict:
    """One detection cell from its runs (seed -> results): mean ± std over seeds of the per-run
    ``detect_precision`` / ``detect_recall``, and the counts of
    :func:`fedidm.task.detection_counts` pooled over every round of every seed (precision
    tp / (tp + fp), recall tp / (tp + fn), benign rejected fp / benign updates)."""
    from fedidm.task import detection_counts

    finals = [r["extra"]["final"] for r in by_seed.values()]
    total: dict[str, int] = defaultdict(int)
    for r in by_seed.values():
        for k, v in detection_counts(r["rounds"]).items():
            total[k] += v
    tp, fp, fn = total["tp"], total["fp"], total["fn"]
    return {
        "precision": mean_std([f.get("detect_precision", 1.0) for f in finals]),
        "recall": mean_std([f.get("detect_recall", 0.0) for f in finals]),
        "pooled_precision": tp / (tp + fp) if tp + fp else 1.0,
        "pooled_recall": tp / (tp + fn) if tp + fn else 1.0,
        "benign_rejected": fp / total["benign_updates"] if total["benign_updates"] else 0.0,
        "seeds": sorted(by_seed),
        **total,
    }


def detection_table(found: dict[Cell, dict]) -> list[str]:
    """FedIDM and FLTrust: per-run means and the counts pooled over rounds and seeds."""
    out = [
        "| method | fraction | attack | precision (mean of rounds) | recall (mean of rounds) | "
        "pooled precision | pooled recall | tp / fp / fn | benign rejected | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in DETECTING:
        for f in FRACTIONS:
            for a in ATTACKS:
                runs = _runs(found, m, a, f)
                if not runs:
                    continue
                d = detection_row(runs)
                out.append(
                    f"| {m} | {f:.0%} | {a} | {_fmt(d['precision'])} | {_fmt(d['recall'])} | "
                    f"{d['pooled_precision']:.3f} | {d['pooled_recall']:.3f} | "
                    f"{d['tp']} / {d['fp']} / {d['fn']} | {d['benign_rejected']:.3f} | "
                    f"{','.join(map(str, d['seeds']))} |"
                )
    return out


def plot(found: dict[Cell, dict], fraction: float, path: Path) -> None:
    """Bars: mean final accuracy over seeds per method and attack; error bar: mean
    acc_std_last10 (stability)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = ("none", *ATTACKS)
    width = 0.8 / len(METHODS)
    fig, ax = plt.subplots(figsize=(12, 4))
    x = np.arange(len(attacks))
    for i, m in enumerate(METHODS):
        acc, err = [], []
        for a in attacks:
            finals = [r["extra"]["final"] for r in _runs(found, m, a, fraction).values()]
            acc.append(np.mean([f["accuracy"] for f in finals]) if finals else np.nan)
            err.append(np.mean([f.get("acc_std_last10", 0.0) for f in finals]) if finals else 0)
        ax.bar(x + i * width - 0.4 + width / 2, acc, width, yerr=err, label=m, capsize=2)
    ax.set_xticks(x, attacks)
    ax.set_ylabel("final accuracy (mean of seeds)\nerror bar: std over last 10 rounds")
    ax.set_title(f"{fraction:.0%} malicious, Fashion-MNIST, 20 clients, Dirichlet 0.5, 10 rounds")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def head_commit() -> str:
    """The repository's short commit (``-dirty`` with uncommitted changes to tracked files)."""
    full = git_commit(ROOT)
    return full[:7] + ("-dirty" if full.endswith("-dirty") else "")


def write_reports(found: dict[Cell, dict], results: Path, fractions=FRACTIONS) -> list[Path]:
    """The README's tables and plots; returns the files written."""
    results.mkdir(parents=True, exist_ok=True)
    made = "made by `python -m fedidm.experiments --skip-runs` at " + head_commit()
    written = []
    for f in fractions:
        pct = round(100 * f)
        used = {c: r for c, r in found.items() if c[2] in (None, f)}
        commits = sorted({r["git_commit"][:7] for r in used.values()})
        n_cells = sum(1 for c in cells((f,)) if c in found)
        lines = [
            f"# {pct} % malicious: {n_cells} of {len(cells((f,)))} cells x seeds found",
            "",
            f"{made}; runs' commits {', '.join(commits)}.",
            "Fashion-MNIST, 20 clients, Dirichlet 0.5, 10 rounds; `none` rows: the no-attack runs"
            " (shared by the fractions). Mean ± std over the seeds listed.",
            "",
            "Mean final accuracy over seeds 0-2 (in brackets: the mean gap in points to the"
            " method's no-attack run of the same seed; bold below -3).",
            "",
            *matrix_table(found, f),
            "",
            *metrics_table(found, f),
            "",
            "Final accuracy per seed; gap to the method's no-attack run of the same seed (bold:"
            " more than 3 points below).",
            "",
            *gap_table(found, f),
            "",
        ]
        md = results / f"grid_{pct}pct.md"
        md.write_text("\n".join(lines))
        png = results / f"grid_{pct}pct.png"
        plot(found, f, png)
        written += [md, png]
    det = results / "detection.md"
    det.write_text(
        "\n".join([f"# Detection, FedIDM and FLTrust ({made})", "", *detection_table(found), ""])
    )
    return [*written, det]


# --------------------------------------------------------------------------- command line


def _run(cmd: list[str], wrap: list[str]) -> int:
    return subprocess.run([*wrap, *cmd], cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "outputs"), help="where new sweeps write")
    ap.add_argument("--search", nargs="*", help="folders to find runs in (default: --out)")
    ap.add_argument("--results", default=str(ROOT / "apps" / "fedidm" / "results"))
    ap.add_argument("--only", default="20,30,40", help="fractions in percent: 20,30,40")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--attacks", default=",".join(("none", *ATTACKS)))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--budget", type=float, default=480.0, help="est. seconds per command")
    ap.add_argument("--jobs", type=int, default=1, help="commands run at once")
    ap.add_argument("--wrap", default="", help="prefix of every runner command")
    ap.add_argument("--dry-run", action="store_true", help="list what would run; run nothing")
    ap.add_argument("--skip-runs", action="store_true", help="only the tables and plots")
    args = ap.parse_args(argv)

    def pick(text: str, known, name: str, conv=str):
        vals = [conv(v) for v in text.split(",") if v]
        bad = [v for v in vals if v not in known]
        if bad:
            raise SystemExit(
                f"--{name}: unknown value {bad[0]!r} (known: {', '.join(map(str, known))})"
            )
        return tuple(vals)

    pcts = pick(args.only, (20, 30, 40), "only", int)
    fractions = tuple(p / 100 for p in pcts)
    methods = pick(args.methods, METHODS, "methods")
    attacks = pick(args.attacks, ("none", *ATTACKS), "attacks")
    seeds = pick(args.seeds, SEEDS, "seeds", int)
    out = Path(args.out).resolve()
    search = [Path(p) for p in (args.search or [out])]
    found, twice = find(search)
    every = cells(fractions, methods, attacks, seeds)
    missing, cmds = plan(found, out, fractions, methods, attacks, seeds, args.budget)
    print(
        f"[experiments] {len(every)} cells selected, {len(every) - len(missing)} found, "
        f"{len(missing)} to run in {len(cmds)} commands"
        + (f"; {len(twice)} cells found twice (later path used)" if twice else ""),
        flush=True,
    )
    wrap = shlex.split(args.wrap)
    for i, cmd in enumerate(cmds, 1):
        tag = "would run" if args.dry_run or args.skip_runs else "queued"
        print(f"[experiments {i}/{len(cmds)}] {tag}: {shlex.join([*wrap, *cmd])}", flush=True)
    if args.dry_run:
        return
    if not args.skip_runs and cmds:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            codes = list(pool.map(lambda c: _run(c, wrap), cmds))
        failed = sum(1 for c in codes if c)
        print(f"[experiments] {len(cmds) - failed} of {len(cmds)} commands exited 0", flush=True)
        found, _ = find(search)
    for p in write_reports(found, Path(args.results), fractions):
        print(f"[experiments] wrote {p}")


if __name__ == "__main__":
    main()
