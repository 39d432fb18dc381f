"""Soak benchmark: the FedAvg app for many rounds with a fraction of clients failing at random.

Runs the app in-process twice with the same seeds, fault-free and with ``fault-rate`` of the
clients' training calls failing (``fault-mode``: raise, hang, exit or mixed), and checks that the
faulty run completes every round, never produces a non-finite model (every round's server-side
loss is finite), and ends within ``--max-gap`` accuracy points of the fault-free run. Prints a
Markdown table and writes ``soak.json`` next to the two runs' ``results.json``.

    nice -n 10 python -m flowerbed.simulation.soak --rounds 200 --fault-rate 0.2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from flowerbed.common.server import output_dir


def run(args) -> dict:
    from flowerbed.simulation.inprocess import run_app

    base = {
        "num-server-rounds": args.rounds,
        "dataset": args.dataset,
        "model": args.model,
        "partitioner": args.partitioner,
        "local-steps": args.local_steps,
        "batch-size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "round-timeout": args.round_timeout,
        "checkpoint": True,
    }
    root = output_dir(args.out, "soak")
    out = {}
    for name, extra in (
        ("fault-free", {}),
        ("faulty", {"fault-mode": args.fault_mode, "fault-rate": args.fault_rate}),
    ):
        t0 = time.perf_counter()
        cfg = {**base, **extra, "results-dir": str(root / name)}
        run_app(
            "fedavg",
            cfg,
            num_supernodes=args.clients,
            num_cpus=args.num_cpus,
            actor_max_restarts=-1,
        )
        rec = json.loads((root / name / "results.json").read_text())
        rounds = [r for r in rec["rounds"] if r["round"] > 0]
        out[name] = {
            "wall_s": round(time.perf_counter() - t0, 1),
            "rounds_done": len(rounds),
            "final_accuracy": rec["extra"]["final"]["accuracy"],
            "all_losses_finite": all(math.isfinite(r["server_loss"]) for r in rounds),
            "failed_calls": sum(
                r.get("num_failures", 0) + r.get("num_timeouts", 0) + r.get("num_rejected", 0)
                for r in rounds
            ),
            "calls": sum(r.get("num_sampled", 0) for r in rounds),
            "rounds_without_update": sum(r.get("num_train_replies", 0) == 0 for r in rounds),
        }
    gap = 100 * (out["fault-free"]["final_accuracy"] - out["faulty"]["final_accuracy"])
    out["accuracy_gap_points"] = round(gap, 2)
    out["ok"] = (
        out["faulty"]["rounds_done"] == args.rounds
        and out["faulty"]["all_losses_finite"]
        and abs(gap) <= args.max_gap
    )
    out["args"] = vars(args)
    (root / "soak.json").write_text(json.dumps(out, indent=1))
    return out


def table(res: dict) -> str:
    rows = ["| run | rounds | final accuracy | failed calls / calls | finite model | wall (s) |"]
    rows.append("|---|---|---|---|---|---|")
    for name in ("fault-free", "faulty"):
        r = res[name]
        rows.append(
            f"| {name} | {r['rounds_done']} | {r['final_accuracy']:.4f} | "
            f"{r['failed_calls']} / {r['calls']} | {r['all_losses_finite']} | {r['wall_s']} |"
        )
    rows.append(f"\naccuracy gap: {res['accuracy_gap_points']:.2f} points; ok: {res['ok']}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="flowerbed-soak", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--fault-rate", type=float, default=0.2)
    ap.add_argument("--fault-mode", default="mixed")
    ap.add_argument("--round-timeout", type=float, default=30.0)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--partitioner", default="iid")
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per virtual client")
    ap.add_argument("--max-gap", type=float, default=2.0, help="accuracy points")
    ap.add_argument("--out", default="soak", help="results folder (relative: under outputs/)")
    res = run(ap.parse_args(argv))
    print(table(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
