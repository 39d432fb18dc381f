"""Benchmark: one app run with each launcher of the runner, interleaved, medians.

    python -m flowerbed.simulation.bench_launchers --app fedqual --repeat 3 -- \
        ++run_config.dataset=ldl/SBU_3DFE ++run_config.corruption-level=0.9

Each timed run is ``flowerbed-run app=<app> launcher=<l> seed=<seed> <overrides>`` in a fresh
process (wall time from the start of the process to its exit, Python start and imports
included), the launchers interleaved run by run; the table gives the median and every run, and
whether the runs of one launcher and of all launchers wrote the same final metrics (the same
seed gives the same numbers on every launcher: ``tests/test_local_engine_equal.py``). Run it on
a quiet machine: the load average before the first run is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(app: str, launcher: str, seed: int, overrides: list[str], out: Path) -> tuple[float, dict]:
    cmd = [
        sys.executable,
        "-m",
        "flowerbed.simulation.runner",
        f"app={app}",
        f"launcher={launcher}",
        f"seed={seed}",
        f"hydra.run.dir={out}",
        *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{launcher}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    results = json.loads(next(out.rglob("results.json")).read_text())
    final = (results.get("extra") or {}).get("final") or results["rounds"][-1]
    return wall, final


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--app", default="fedqual")
    ap.add_argument("--launchers", default="inprocess,local")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="runner overrides (after --)")
    args = ap.parse_args(argv)
    launchers = args.launchers.split(",")
    load = os.getloadavg()
    walls: dict[str, list[float]] = {lau: [] for lau in launchers}
    finals: dict[str, list[dict]] = {lau: [] for lau in launchers}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for lau in launchers:
                wall, final = _run(
                    args.app, lau, args.seed, args.overrides, Path(tmp) / f"{lau}{i}"
                )
                walls[lau].append(wall)
                finals[lau].append(final)
                print(f"[{i + 1}/{args.repeat}] {lau}: {wall:.1f} s", flush=True)
    print(
        f"\napp={args.app} seed={args.seed} {' '.join(args.overrides)}; "
        f"load average before the first run {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n"
    )
    print("| launcher | median wall (s) | runs (s) |")
    print("|---|---|---|")
    for lau in launchers:
        runs = ", ".join(f"{w:.1f}" for w in walls[lau])
        print(f"| {lau} | {statistics.median(walls[lau]):.1f} | {runs} |")
    every = [f for lau in launchers for f in finals[lau]]
    same = all(json.dumps(f, sort_keys=True) == json.dumps(every[0], sort_keys=True) for f in every)
    print(f"\nsame final metrics in every run and launcher: {same}")
    if not same:
        for lau in launchers:
            print(f"  {lau}: {finals[lau]}")


if __name__ == "__main__":
    main()
