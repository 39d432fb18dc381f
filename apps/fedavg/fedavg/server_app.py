"""FedAvg ServerApp: FedAvg/FedProx with server-side evaluation on the test split.

Options (run config, all off by default): central DP (``dp-noise-multiplier``), a checkpoint per
round and resume (``checkpoint``, ``resume``), a per-round reply timeout (``round-timeout``) and
secure aggregation with Flower's SecAgg+ (``secagg``, see :mod:`fedavg.secagg`).
"""

import json
import random

import numpy as np
from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedavg.task import central_evaluator, initial_arrays, label_histograms, parse_config
from flowerbed.common.results import ResultsWriter
from flowerbed.common.seeding import derive_seed
from flowerbed.common.server import output_dir, run_strategy
from flowerbed.strategies.fedavg import FedAvg

app = ServerApp()


def build_strategy(cfg: dict, num_nodes: int):
    """flowerbed FedAvg, wrapped with central DP when ``dp-noise-multiplier`` > 0."""
    strategy = FedAvg(
        fraction_train=cfg["fraction-train"],
        fraction_evaluate=cfg["fraction-evaluate"],
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
        max_update_norm=cfg["max-update-norm"] or None,
        min_train_replies=cfg["min-train-replies"],
        sample_seed=cfg["seed"] if cfg["fraction-train"] < 1 else None,
    )
    if cfg["dp-noise-multiplier"] > 0:
        from flowerbed.strategies.dpfedavg import DPFedAvg

        sampled = min(max(int(num_nodes * cfg["fraction-train"]), 1), num_nodes)
        strategy = DPFedAvg(
            strategy,
            noise_multiplier=cfg["dp-noise-multiplier"],
            clipping_norm=cfg["dp-clipping-norm"],
            num_sampled_clients=sampled,
            population_size=num_nodes,
            delta=cfg["dp-delta"],
        )
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value
    random.seed(derive_seed(cfg["seed"], 0x5E))
    np.random.seed(derive_seed(cfg["seed"], 0xD9) % 2**32)  # DP noise
    out = output_dir(cfg["results-dir"], "fedavg")
    writer = ResultsWriter(out, cfg, app="fedavg")
    num_nodes = len(list(grid.get_node_ids()))
    if cfg["secagg"]:
        from fedavg.secagg import run_secagg

        final = run_secagg(
            grid, context, cfg, writer, central_evaluator(cfg), initial_arrays(cfg), num_nodes
        )
        writer.set("label_histograms", label_histograms(cfg, num_nodes))
        writer.set("final", final)
        print(
            f"[flowerbed] fedavg (SecAgg+) final test accuracy "
            f"{final.get('accuracy', float('nan')):.4f} -> {writer.write(final=True)}",
            flush=True,
        )
        return
    strategy = build_strategy(cfg, num_nodes)
    if cfg["checkpoint"] or cfg["resume"]:
        from flowerbed.common.checkpoint import Checkpointed

        previous = []
        if cfg["resume"] and writer.path.exists():
            previous = json.loads(writer.path.read_text()).get("rounds", [])

        def on_resume(done: int) -> None:
            writer.record["rounds"] = [r for r in previous if r["round"] <= done]
            writer.set("resumed_from_round", done)

        strategy = Checkpointed(strategy, out, resume=cfg["resume"], on_resume=on_resume)
    evaluate = central_evaluator(cfg)
    result = run_strategy(
        strategy,
        grid,
        initial_arrays(cfg),
        cfg["num-server-rounds"],
        writer,
        train_config=ConfigRecord({}),
        evaluate_fn=lambda rnd, arrays: MetricRecord(evaluate(rnd, arrays)),
        timeout=cfg["round-timeout"],
    )
    writer.set("label_histograms", label_histograms(cfg, num_nodes))
    final = dict(result.evaluate_metrics_serverapp.get(cfg["num-server-rounds"], {}))
    if hasattr(strategy, "strategy") and hasattr(strategy.strategy, "epsilon"):
        final["dp_epsilon"] = strategy.strategy.epsilon()
    elif hasattr(strategy, "epsilon"):
        final["dp_epsilon"] = strategy.epsilon()
    totals = writer.record["extra"].get("totals", {})
    history = getattr(strategy, "history", {})
    totals["num_failed_calls"] = sum(
        r.get("num_failures", 0) + r.get("num_timeouts", 0) + r.get("num_rejected", 0)
        for r in history.values()
    )
    writer.set("totals", totals)
    writer.set("final", final)
    print(
        f"[flowerbed] fedavg final test accuracy {final.get('accuracy', float('nan')):.4f} "
        f"-> {writer.write(final=True)}",
        flush=True,
    )
