"""FedDistr ServerApp: the method's strategy (from the method table), run, final metrics.

``feddistr`` (and its ablation) is the one-shot :class:`~flowerbed.strategies.feddistr.FedDistr`
strategy (one round, whatever ``num-server-rounds``: the method table's ``rounds`` flag);
``fedavg`` / ``fedprox`` run ``num-server-rounds`` rounds on the same partitions (accuracy and
cumulative bytes also kept at rounds 1, 10 and 50); ``centralized`` trains on the pooled data.
"""

from __future__ import annotations

import torch
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from feddistr.task import (
    central_evaluator,
    final_metrics,
    label_histograms,
    make_model,
    parse_config,
    private_pool,
    server_pieces,
)
from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.records import to_record, wire_nbytes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)  # far faster than 2 threads on a shared 2-core machine
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value
    nodes = wait_for_nodes(grid)
    writer = ResultsWriter(output_dir(cfg["results-dir"], "feddistr"), cfg, app="feddistr")
    writer.set("label_histograms", label_histograms(cfg, len(nodes)))  # checks the partitioner
    rounds = cfg.method.flag("rounds", cfg["num-server-rounds"])
    # every factory of the table takes the server pieces it needs, by keyword
    strategy = cfg.method.strategy(cfg, **server_pieces(cfg, writer))
    result = run_method(
        strategy, grid, cfg, writer, to_record(make_model(cfg)), central_evaluator(cfg), rounds
    )
    final = final_metrics(writer, result, rounds)
    if cfg.method.flag("model_delivery"):
        model_bytes = wire_nbytes(RecordDict({"arrays": result.arrays}))
        final["bytes_with_model_delivery"] = final["bytes_total"] + model_bytes * len(nodes)
    if cfg.method.flag("raw_upload"):  # centralized: the raw float32 images and int64 labels
        x, y = private_pool(cfg)
        final["bytes_raw_upload"] = int(x.size * 4 + y.size * 8)
        final["bytes_total"] += final["bytes_raw_upload"]
    final.update(
        {
            k: v
            for k, v in getattr(strategy, "history", {}).get(rounds, {}).items()
            if isinstance(v, int | float)
        }  # fmt: skip
    )
    if hasattr(strategy, "consolidated"):
        writer.set(
            "consolidated",
            [
                {"label": d.label, "count": d.count, "sources": d.sources}
                for d in strategy.consolidated
            ],
        )
    label = f"feddistr method={cfg['method']} partitioner={cfg['partitioner']}"
    finish(writer, final, label, "accuracy", strategy)
