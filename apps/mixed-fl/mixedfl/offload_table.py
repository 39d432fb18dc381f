"""The README's offloading table: ``offload`` vs ``offload-baseline``, several seeds, one command.

Each run goes through ``launcher=local`` (:func:`flowerbed.simulation.local.run_local`), one
MovieLens-100K user per node. From each ``results.json`` it reads, per sampled client and round
(mean over rounds and seeds): the bytes down and up (the protocol layer's count over every phase
of the round: the ``offload.ids`` upload included), the client FLOPs (analytic), the rows with a
gradient summed over the steps (measured), the SGD steps (measured) and wall time; the server's
FLOPs per round; the final recall@10, ``f_f`` and ``f_c``. Then the saving of ``offload`` over
the baseline in %, with the commit::

    PYTHONPATH=apps/mixed-fl .venv/bin/python -m mixedfl.offload_table --seeds 0,1,2 \\
        --users 943 --rounds 10 --out outputs/mixed-fl/offload
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from flowerbed.common.results import git_commit
from mixedfl.table import run_one

METHODS = ("offload", "offload-baseline")


def per_client(records: list[dict]) -> dict[str, float]:
    """Means over the rounds >= 1 of every run of one method, per sampled client."""
    vals: dict[str, list[float]] = {}
    for rec in records:
        for r in rec["rounds"]:
            if r["round"] < 1:
                continue
            k = r["phases"]["train"]["num_sent"]
            for name, v in (
                ("down", r["bytes_sent"] / k),
                ("up", r["bytes_received"] / k),
                ("flops", r["train_client-flops"]),
                ("rows", r["train_client-rows"]),
                ("steps", r["train_client-steps"]),
                ("ms", 1000 * r["train_train-time-s"]),
                ("server_flops", r["server_flops"]),
            ):
                vals.setdefault(name, []).append(float(v))
    out = {k: float(np.mean(v)) for k, v in vals.items()}
    for key in ("recall@10", "f_f", "f_c"):
        xs = [rec["extra"]["final"][key] for rec in records]
        out[key], out[key + "_std"] = float(np.mean(xs)), float(np.std(xs))
    return out


def markdown(rows: dict[str, dict]) -> str:
    lines = [
        "| method | down / client / round (B) | up / client / round (B) | client FLOPs / round "
        "| client rows updated / round | client steps | client SGD ms / round "
        "| server FLOPs / round | recall@10 | f_f | f_c |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        lines.append(
            f"| `{m}` | {r['down']:,.0f} | {r['up']:,.0f} | {r['flops']:,.0f} | {r['rows']:,.0f} "
            f"| {r['steps']:.0f} | {r['ms']:.1f} | {r['server_flops']:,.0f} "
            f"| {r['recall@10']:.4f} ± {r['recall@10_std']:.4f} | {r['f_f']:.4f} "
            f"| {r['f_c']:.2f} |"
        )
    return "\n".join(lines)


def savings(off: dict, base: dict) -> dict[str, float]:
    """``100 (1 - offload / baseline)`` for the client's bytes and compute."""
    return {
        k: 100.0 * (1.0 - off[k] / base[k]) for k in ("down", "up", "flops", "rows") if base[k]
    } | {"bytes (both ways)": 100.0 * (1 - (off["down"] + off["up"]) / (base["down"] + base["up"]))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--users", type=int, default=943, help="offload-users (= nodes)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--set", default="", help="more run-config overrides: 'k=v k2=v2'")
    ap.add_argument("--out", default="outputs/mixed-fl/offload")
    args = ap.parse_args(argv)
    overrides: dict = dict(kv.split("=", 1) for kv in args.set.split())
    overrides.update({"offload-users": args.users, "num-server-rounds": args.rounds})
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    rows = {}
    for m in METHODS:
        recs = []
        for s in seeds:
            t0 = time.perf_counter()
            recs.append(run_one(m, s, out, overrides, args.users))
            fin = recs[-1]["extra"]["final"]
            print(
                f"[offload table] {m} seed {s}: recall@10 {fin['recall@10']:.4f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        rows[m] = per_client(recs)
    saved = savings(rows["offload"], rows["offload-baseline"])
    summary = (
        f"commit `{git_commit()}`, seeds {args.seeds}, overrides {overrides}, "
        f"{args.users} clients (one user each)\n\n{markdown(rows)}\n\n"
        + "\n".join(f"- client {k} saved by offloading: {v:.1f} %" for k, v in saved.items())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(summary + "\n")
    print(summary, flush=True)


if __name__ == "__main__":
    main()
