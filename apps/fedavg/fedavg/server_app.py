"""FedAvg ServerApp: FedAvg/FedProx with server-side evaluation on the test split."""

import random

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedavg.task import central_evaluator, initial_arrays, label_histograms, parse_config
from flowerbed.common.results import ResultsWriter
from flowerbed.common.seeding import derive_seed
from flowerbed.common.server import output_dir, run_strategy
from flowerbed.strategies.fedavg import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value
    random.seed(derive_seed(cfg["seed"], 0x5E))
    writer = ResultsWriter(output_dir(cfg["results-dir"], "fedavg"), cfg, app="fedavg")
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
    evaluate = central_evaluator(cfg)
    result = run_strategy(
        strategy,
        grid,
        initial_arrays(cfg),
        cfg["num-server-rounds"],
        writer,
        train_config=ConfigRecord({}),
        evaluate_fn=lambda rnd, arrays: MetricRecord(evaluate(rnd, arrays)),
    )
    writer.set("label_histograms", label_histograms(cfg, len(list(grid.get_node_ids()))))
    final = result.evaluate_metrics_serverapp.get(cfg["num-server-rounds"], {})
    writer.set("final", dict(final))
    print(
        f"[flowerbed] fedavg final test accuracy {final.get('accuracy', float('nan')):.4f} "
        f"-> {writer.write(final=True)}",
        flush=True,
    )
