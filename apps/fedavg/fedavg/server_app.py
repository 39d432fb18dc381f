"""FedAvg ServerApp: the method's strategy, server-side evaluation on the test split, run.

Options (run config, all off by default): participation-gap evaluation
(``unparticipating-fraction`` > 0: those clients never train, every client is evaluated on its
splits, :mod:`flowerbed.common.participation`), central DP (``dp-noise-multiplier``), a checkpoint per
round and resume (``checkpoint``, ``resume``), a per-round reply timeout (``round-timeout``) and
secure aggregation with Flower's SecAgg+ (``secagg``, see :mod:`fedavg.secagg`).
"""

import random

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedavg.task import central_evaluator, initial_arrays, label_histograms, parse_config
from flowerbed.common.attacks import with_attack
from flowerbed.common.participation import final_gaps, with_participation
from flowerbed.common.results import ResultsWriter
from flowerbed.common.seeding import derive_seed
from flowerbed.common.server import finish, output_dir, run_method, with_options

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value
    random.seed(derive_seed(cfg["seed"], 0x5E))
    np.random.seed(derive_seed(cfg["seed"], 0xD9) % 2**32)  # DP noise
    writer = ResultsWriter(output_dir(cfg["results-dir"], "fedavg"), cfg, app="fedavg")
    num_nodes = len(list(grid.get_node_ids()))
    evaluate = central_evaluator(cfg)
    if cfg["secagg"]:
        from fedavg.secagg import run_secagg

        final = run_secagg(grid, context, cfg, writer, evaluate, initial_arrays(cfg), num_nodes)
    else:
        inner = with_participation(cfg.method.strategy(cfg), cfg)  # off unless configured
        strategy = with_options(with_attack(inner, cfg), cfg, writer, num_nodes)
        result = run_method(strategy, grid, cfg, writer, initial_arrays(cfg), evaluate)
        final = dict(result.evaluate_metrics_serverapp.get(cfg["num-server-rounds"], {}))
        final.update(final_gaps(result, cfg["num-server-rounds"]))  # the gap columns
    writer.set("label_histograms", label_histograms(cfg, num_nodes))
    label = f"fedavg {cfg['method']}" + (" (SecAgg+)" if cfg["secagg"] else "")
    finish(writer, final, label, "accuracy", None if cfg["secagg"] else strategy)
