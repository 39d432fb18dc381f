"""One command for the README's SmolLM2 tables: every sweep of the results table, of the
split/centralized controls (3 seeds) and of the gradient-DP rows, then the two reports.

    python -m flllama.experiments                     # all sweeps that have no results yet, then both tables
    python -m flllama.experiments --only gdp          # one group: table, gap, gdp or title
    python -m flllama.experiments --match sigma-s43   # only the sweeps whose folder matches
    python -m flllama.experiments --dry-run           # print the runner commands, run nothing

Run from the repository root or from ``apps/fl-llama``; outputs go to ``--out`` (default
``outputs`` of the repository). Each sweep is one ``flowerbed-run -m`` (Hydra multirun) into its
own folder; a sweep whose folder already holds one ``results.json`` per job is kept, not re-run,
so the command also rebuilds the tables from earlier runs. Each run prints its progress (the
runner's own log); one SmolLM2 run takes ~1-3 minutes on one CPU core (``OMP_NUM_THREADS=1``).
The tables are written by :mod:`flllama.report` to ``OUT/fl-llama-table/table.md`` and
``OUT/fl-llama-gap/gap.md`` and ``OUT/fl-llama-title/title.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# the schedule of every SmolLM2 row in the README (3 rounds x 8 steps, p = q = 2, batch 4)
COMMON = (
    "app=fl-llama",
    "launcher=local",
    "++run_config.num-server-rounds=3",
    "++run_config.sync-steps=8",
    "++run_config.split-a=2",
    "++run_config.split-c=2",
    "++run_config.max-chars=160",
    "++run_config.batch-size=4",
    "++run_config.lr=5e-4",
    "++run_config.eval-samples=48",
)
SPLIT = "++run_config.method=split-sequential"
CENTRAL = "++run_config.method=centralized"

# (group, folder under OUT, overrides after COMMON)
SWEEPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("table", "fl-llama-table/central", (CENTRAL,)),
    ("table", "fl-llama-table/sigma0", (SPLIT, "++run_config.sigma=0.0")),
    (
        "table",
        "fl-llama-table/nocompr",
        (SPLIT, "++run_config.mask-compression=false", "++run_config.num-server-rounds=1"),
    ),
    ("table", "fl-llama-table/sigma-a", (SPLIT, "++run_config.sigma=0.02,0.05")),
    ("table", "fl-llama-table/sigma-b", (SPLIT, "++run_config.sigma=0.1")),
    # session 6: the sigma sweep at seeds 43 and 44 (sigma 0 and centralized: the gap sweeps)
    ("table", "fl-llama-table/sigma-s43", (SPLIT, "++run_config.sigma=0.02,0.05,0.1", "seed=43")),
    ("table", "fl-llama-table/sigma-s44", (SPLIT, "++run_config.sigma=0.02,0.05,0.1", "seed=44")),
    ("gap", "fl-llama-gap/central-k1", ("app.num_supernodes=1", CENTRAL)),
    ("gap", "fl-llama-gap/split-k1", ("app.num_supernodes=1", SPLIT)),
    ("gap", "fl-llama-gap/central-s", (CENTRAL, "seed=43,44")),
    ("gap", "fl-llama-gap/split-s", (SPLIT, "seed=43,44")),
    ("gap", "fl-llama-gap/split-every1", (SPLIT, "++run_config.sync-every=1")),
    ("gap", "fl-llama-gap/split-every1-s", (SPLIT, "++run_config.sync-every=1", "seed=43,44")),
    (
        "gap",
        "fl-llama-gap/split-lr2",
        (SPLIT, "++run_config.client-lr-scale=2.0", "++run_config.sync-every=0,1"),
    ),
    ("gap", "fl-llama-gap/split-lr2-s", (SPLIT, "++run_config.client-lr-scale=2.0", "seed=43,44")),
    (
        "gdp",
        "fl-llama-gap/split-gdp",
        (SPLIT, "++run_config.grad-dp-clip=0.04", "++run_config.grad-dp-noise=0.0,1.0"),
    ),
    (
        "gdp",
        "fl-llama-gap/split-gdp2",
        (SPLIT, "++run_config.grad-dp-clip=0.04", "++run_config.grad-dp-noise=0.05,0.1,0.3"),
    ),
    (
        "gdp",
        "fl-llama-gap/split-gdp3",
        (SPLIT, "++run_config.grad-dp-clip=0.04", "++run_config.grad-dp-noise=0.003,0.01"),
    ),
    # session 7: summary -> title generation, split vs centralized at seed 42 (same schedule)
    ("title", "fl-llama-title/central", (CENTRAL, "++run_config.task=title")),
    ("title", "fl-llama-title/split", (SPLIT, "++run_config.task=title")),
)
GROUPS = ("table", "gap", "gdp", "title")


def jobs(overrides: tuple[str, ...]) -> int:
    """Number of runs of one multirun: the product of the comma-list lengths."""
    return math.prod(len(o.split("=", 1)[1].split(",")) for o in overrides if "=" in o)


def done(folder: Path, overrides: tuple[str, ...]) -> bool:
    """A sweep is done when its folder holds one ``results.json`` per job."""
    return len(list(folder.rglob("results.json"))) >= jobs(overrides)


def command(out: Path, folder: str, overrides: tuple[str, ...]) -> list[str]:
    """The runner command of one sweep (Hydra multirun into ``out/folder``)."""
    return [
        sys.executable,
        "-m",
        "flowerbed.simulation.runner",
        "-m",
        *COMMON,
        *overrides,
        f"hydra.sweep.dir={out / folder}",
    ]


def plan(
    out: Path, only: tuple[str, ...] = GROUPS, match: str = ""
) -> list[tuple[list[str], bool]]:
    """Every sweep of the selected groups (and whose folder contains ``match``): (command,
    already done)."""
    return [
        (command(out, folder, ov), done(out / folder, COMMON + ov))
        for group, folder, ov in SWEEPS
        if group in only and match in folder
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "outputs"))
    ap.add_argument("--only", default=",".join(GROUPS), help="comma list of: " + ", ".join(GROUPS))
    ap.add_argument("--match", default="", help="only the sweeps whose folder contains this")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    out, only = Path(args.out).resolve(), tuple(args.only.split(","))
    bad = [g for g in only if g not in GROUPS]
    if bad:
        raise SystemExit(f"--only: unknown group {bad[0]!r} (known: {', '.join(GROUPS)})")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    steps = plan(out, only, args.match)
    print(f"[experiments] {sys.executable} -m flowerbed.simulation.runner -m {' '.join(COMMON)}")
    for i, (cmd, finished) in enumerate(steps, 1):
        tag = "kept (results exist)" if finished else ("would run" if args.dry_run else "running")
        ov = " ".join(cmd[4 + len(COMMON) :])
        print(f"[experiments {i}/{len(steps)}] {tag}: ... {ov}", flush=True)
        if not finished and not args.dry_run:
            subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    if args.dry_run:
        return
    from flllama import report

    if "table" in only:  # + the centralized and sigma-0 runs of seeds 43, 44 (gap sweeps)
        gap = out / "fl-llama-gap"
        report.main([str(out / "fl-llama-table"), str(gap / "central-s"), str(gap / "split-s")])
    if {"gap", "gdp"} & set(only):
        report.main(["--gap", str(out / "fl-llama-gap"), str(out / "fl-llama-table")])
    if "title" in only:
        report.main(["--title", str(out / "fl-llama-title")])


if __name__ == "__main__":
    main()
