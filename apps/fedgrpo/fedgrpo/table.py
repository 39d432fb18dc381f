"""``python -m fedgrpo.table``: the README's SmolLM2 table, one command, resumable.

Runs every (method, seed) cell that has no ``results.json`` yet in ``<out>/<method>/seed<s>/``
(in process, :func:`flowerbed.simulation.local.run_local`, ``--nodes`` clients; the run config
of ``pyproject.toml`` with ``--set`` overrides), then prints the table: mean +/- std over the
seeds of the held-out accuracy per domain before (round 0) and after the last round, the format
rate, the mean error of the received rewards, and the bytes per prompt (FedGRPO: upstream, per
prompt; FedAvg-SFT: one client's adapter upload per round). ``--limit n`` stops after ``n`` new
runs (the machine's slots: call it again to resume; a run stopped early is run again); ``--report`` only prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedgrpo.measure import overrides as parse_overrides
from fedgrpo.methods import METHODS as TABLE
from flowerbed.simulation.table import mean_std

METHODS = TABLE.names  # the rows, in the method table's order
COLUMNS = (
    ("acc before", "before_accuracy"),
    ("acc after", "accuracy"),
    ("arith before/after", ("before_acc_arithmetic", "acc_arithmetic")),
    ("units before/after", ("before_acc_units", "acc_units")),
    ("dates before/after", ("before_acc_dates", "acc_dates")),
    ("format before/after", ("before_format", "format")),
    ("train reward (mean of rounds)", "train_reward_mean"),
    ("reward error (mean of rounds)", "reward_error_mean"),
    ("bytes up per prompt", "bytes_up_per_prompt"),
    ("bytes up per client and round", "bytes_up_per_client_round"),
)


def cell_dir(out: Path, method: str, seed: int) -> Path:
    return Path(out) / method / f"seed{seed}"


def run_cell(out: Path, method: str, seed: int, overrides: dict, nodes: int) -> dict:
    """One run (skipped if its ``results.json`` exists); returns the results record."""
    from flowerbed.simulation.local import run_local

    folder = cell_dir(out, method, seed)
    res = folder / "results.json"
    if not _has(out, method, seed):
        run_local(
            "fedgrpo",
            {**overrides, "method": method, "seed": seed, "results-dir": str(folder)},
            nodes,
        )
    return json.loads(res.read_text())


def derived(rec: dict) -> dict:
    """The final metrics plus the means over the rounds of the reward error and train reward,
    and FedAvg-SFT's upload bytes per client and round."""
    final = dict(rec["extra"]["final"])
    rounds = [r for r in rec["rounds"] if r["round"] > 0]
    for key, name in (("reward_error", "reward_error_mean"), ("reward_mean", "train_reward_mean")):
        vals = [r[key] for r in rounds if isinstance(r.get(key), int | float)]
        if vals:
            final[name] = sum(vals) / len(vals)
    phases = [r.get("phases", {}) for r in rounds]
    replies = sum(p["train"]["num_replies"] for p in phases if "train" in p)
    if replies:  # FedAvg rounds: every reply uploads the adapter
        final["bytes_up_per_client_round"] = final.get("bytes_received", 0) / replies
    return final


def _fmt(vals: list[float], digits: int) -> str:
    if not vals:
        return "–"
    m, sd = mean_std(vals)
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(vals) > 1 else f"{m:.{digits}f}"


def table(out: Path, methods, seeds) -> str:
    """The markdown table of the runs found under ``out``."""
    head = ["method", "seeds", *[c for c, _ in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        finals = []
        for s in seeds:
            if _has(out, method, s):
                res = cell_dir(out, method, s) / "results.json"
                finals.append(derived(json.loads(res.read_text())))
        if not finals:
            continue
        row = [f"`{method}`", ",".join(str(s) for s in seeds if _has(out, method, s))]
        for _, key in COLUMNS:
            keys = key if isinstance(key, tuple) else (key,)
            digits = 0 if "bytes" in keys[0] else 3
            parts = [_fmt([f[k] for f in finals if k in f], digits) for k in keys]
            row.append(" → ".join(parts))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _has(out, method, seed) -> bool:
    """A finished run (a run stopped early leaves a ``results.json`` without ``final``)."""
    res = cell_dir(out, method, seed) / "results.json"
    return res.exists() and "final" in json.loads(res.read_text())["extra"]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="outputs/fedgrpo_table")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--set", nargs="*", default=[], help="run-config overrides key=value")
    ap.add_argument("--nodes", type=int, default=6)
    ap.add_argument("--limit", type=int, default=0, help="stop after this many new runs")
    ap.add_argument("--report", action="store_true", help="only print the table")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()  # a relative results-dir would be placed under outputs/
    overrides = parse_overrides(args.set)
    done = 0
    for seed in args.seeds:
        for method in args.methods:
            if args.report or _has(out, method, seed):
                continue
            if args.limit and done >= args.limit:
                break
            t0 = time.perf_counter()
            print(f"[fedgrpo.table] run {method} seed {seed} {overrides}", flush=True)
            rec = run_cell(out, method, seed, overrides, args.nodes)
            f = rec["extra"]["final"]
            print(
                f"[fedgrpo.table] {method} seed {seed}: accuracy {f.get('before_accuracy')} -> "
                f"{f.get('accuracy')} in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
            done += 1
    text = table(out, args.methods, args.seeds)
    print(text)
    return text


if __name__ == "__main__":
    main()
