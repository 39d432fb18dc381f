"""FedAvg as a plain in-process sequential loop: the benchmark's reference.

It calls the same task functions as the FedAvg app (``local_train``, ``central_evaluator``,
identical data, model, seeds, sampled clients and number of local steps) and averages with the
same rule, but with no Flower, no Ray, no messages. ``python -m flowerbed.simulation.plain``
prints the accuracy per round.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from flowerbed.common.seeding import sample_partitions
from flowerbed.simulation.inprocess import app_dir, load_components


def fedavg_task():
    """The FedAvg app's task module (imported as Flower would load the app)."""
    load_components(app_dir("fedavg"))
    import fedavg.task as task

    return task


def weighted_mean(updates: list[tuple[ArrayRecord, int]]) -> ArrayRecord:
    total = sum(n for _, n in updates)
    out: dict[str, np.ndarray] = {}
    for rec, n in updates:
        for k, a in rec.items():
            v = a.numpy() * (n / total)
            out[k] = v if k not in out else out[k] + v
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()})


def run(
    overrides: dict[str, Any],
    num_partitions: int,
    clients_per_round: int | None = None,
    on_round=None,
) -> dict[str, Any]:
    """Sequential FedAvg; returns per-round server metrics and timings."""
    t_entry = time.perf_counter()
    task = fedavg_task()
    cfg = task.parse_config(overrides)
    k = clients_per_round or num_partitions
    arrays = task.initial_arrays(cfg)
    evaluate = task.central_evaluator(cfg)
    t_eval = time.perf_counter()
    history = {0: evaluate(0, arrays)}
    setup = {"imports_s": t_eval - t_entry, "initial_eval_s": time.perf_counter() - t_eval}
    times, train_times, steps = [], [], []
    for rnd in range(1, cfg["num-server-rounds"] + 1):
        t0 = time.perf_counter()
        pids = (
            list(range(num_partitions))
            if k >= num_partitions
            else sample_partitions(cfg["seed"], rnd, num_partitions, k)
        )
        updates, train_s, steps_s = [], [], []
        for pid in pids:
            rec, metrics = task.local_train(cfg, arrays, pid, num_partitions, rnd)
            updates.append((rec, int(metrics["num-examples"])))
            train_s.append(metrics["train-time-s"])
            steps_s.append(metrics["steps"])
        train_times.append(sum(train_s) / len(train_s))
        steps.append(sum(steps_s) / len(steps_s))
        arrays = weighted_mean(updates)
        history[rnd] = evaluate(rnd, arrays)
        # like the ServerApp's round time (common/server.py): training, aggregation and the
        # server-side evaluation of the round
        times.append(time.perf_counter() - t0)
        if on_round:
            on_round(rnd, history[rnd], times[-1])
    return {
        "history": history,
        "round_times": times,
        "train_times": train_times,  # mean local-SGD wall time per client call, per round
        "steps": steps,  # mean local SGD steps per client call, per round
        **setup,
        "arrays": arrays,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="FedAvg app as a plain sequential loop")
    ap.add_argument("--num-partitions", type=int, default=10)
    ap.add_argument("--clients-per-round", type=int, default=None)
    ap.add_argument("--set", nargs="*", default=[], help="run-config overrides key=value")
    a = ap.parse_args()
    import tomllib

    overrides = {
        kv.split("=", 1)[0]: tomllib.loads(f"v={kv.split('=', 1)[1]}")["v"] for kv in a.set
    }
    run(
        overrides,
        a.num_partitions,
        a.clients_per_round,
        on_round=lambda r, m, t: print(
            f"round {r}: accuracy={m['accuracy']:.4f} ({t:.2f} s)", flush=True
        ),
    )


if __name__ == "__main__":
    main()
