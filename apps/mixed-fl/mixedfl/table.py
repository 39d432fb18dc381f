"""The README's blending table: every method of the app, several seeds, one command.

Runs each method with each seed through ``launcher=local`` (the app's ServerApp and ClientApp in
one process, no Ray: :func:`flowerbed.simulation.local.run_local`), prints a line per run, then a
Markdown table (mean and std over seeds) of the accuracy on the inference distribution (the whole
Fashion-MNIST test split), on the clients' classes and on the others, the bytes per sampled client
and round in each direction (the protocol layer's count, round 1), and the client compute per
round (examples through forward and backward, SGD wall time), with the commit::

    .venv/bin/python -m mixedfl.table --seeds 0,1,2 --out outputs/mixed-fl/blend
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from flowerbed.common.results import git_commit


def run_one(method: str, seed: int, out: Path, overrides: dict, num_supernodes: int) -> dict:
    """One run; returns its ``results.json``."""
    from flowerbed.simulation.local import run_local

    folder = out / f"{method}-seed{seed}"
    run_local(
        "mixed-fl",
        {**overrides, "method": method, "seed": seed, "results-dir": str(folder.resolve())},
        num_supernodes=num_supernodes,
    )
    return json.loads((folder / "results.json").read_text())


def row(records: list[dict]) -> dict:
    """Mean / std over seeds of what the table shows."""
    acc = [r["extra"]["final"]["accuracy"] for r in records]
    seen = [r["extra"]["final"]["accuracy-client-classes"] for r in records]
    other = [r["extra"]["final"]["accuracy-other-classes"] for r in records]
    r1 = records[0]["rounds"][1]
    train = r1.get("phases", {}).get("train", {})
    sent = max(train.get("num_sent", 0), 1)
    return {
        "acc": (float(np.mean(acc)), float(np.std(acc))),
        "seen": float(np.mean(seen)),
        "other": float(np.mean(other)),
        "down": train.get("bytes_sent", 0) / sent,
        "up": train.get("bytes_received", 0) / sent,
        "examples": r1.get("train_client-examples", 0),
        "time_ms": 1000
        * float(np.mean([r["rounds"][1].get("train_train-time-s", 0) for r in records])),
    }


def markdown(rows: dict[str, dict]) -> str:
    lines = [
        "| method | accuracy (all classes) | on clients' classes | on the others "
        "| down / client / round (B) | up / client / round (B) | client examples / round "
        "| client SGD ms / round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        mean, std = r["acc"]
        lines.append(
            f"| `{m}` | {mean:.4f} ± {std:.4f} | {r['seen']:.4f} | {r['other']:.4f} "
            f"| {r['down']:,.0f} | {r['up']:,.0f} | {r['examples']:.0f} | {r['time_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from mixedfl.methods import METHODS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS.names))
    ap.add_argument("--rounds", type=int, default=None, help="num-server-rounds (default: app's)")
    ap.add_argument("--num-supernodes", type=int, default=20)
    ap.add_argument("--set", default="", help="more run-config overrides: 'k=v k2=v2'")
    ap.add_argument("--out", default="outputs/mixed-fl/blend")
    args = ap.parse_args(argv)
    overrides: dict = dict(kv.split("=", 1) for kv in args.set.split())
    if args.rounds:
        overrides["num-server-rounds"] = args.rounds
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {}
    for m in args.methods.split(","):
        recs = []
        for s in seeds:
            t0 = time.perf_counter()
            rec = run_one(m, s, out, overrides, args.num_supernodes)
            recs.append(rec)
            print(
                f"[mixed-fl table] {m} seed {s}: accuracy {rec['extra']['final']['accuracy']:.4f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        rows[m] = row(recs)
    text = markdown(rows)
    oracle = rows.get("oracle", {}).get("acc", (float("nan"),))[0]
    checks = [
        f"- `{m}` within 2 points of the oracle: {oracle - r['acc'][0] <= 0.02} "
        f"(gap {100 * (oracle - r['acc'][0]):+.2f} points)"
        for m, r in rows.items()
        if m != "oracle"
    ]
    commit = git_commit()
    summary = (
        f"commit `{commit}`, seeds {args.seeds}, overrides {overrides or 'none'}, "
        f"{args.num_supernodes} clients\n\n{text}\n\n" + "\n".join(checks)
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(summary + "\n")
    print(summary, flush=True)


if __name__ == "__main__":
    main()
