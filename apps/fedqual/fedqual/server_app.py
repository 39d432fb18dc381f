"""FedQual ServerApp: the method's strategy (FedQual and its ablations, FedAvg, FedProx,
local-only, centralized) from the method table, server-side evaluation on the clean test split.

All methods write the same ``results.json``: per-round server-side LDL measures on the clean test
split, bytes per round from the protocol layer, per-round quality estimates / reliability weights
/ calibration weights (FedQual), the hidden per-client corruption levels, and ``final`` = the six
LDL measures.
"""

from __future__ import annotations

import random

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedqual.ldl import METRICS
from fedqual.task import (
    central_evaluator,
    central_fit,
    initial_arrays,
    levels_of,
    parse_config,
    partitions_of,
)
from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.seeding import derive_seed
from flowerbed.common.server import finish, output_dir, run_method, with_options

app = ServerApp()


def quality_vs_level(history: dict, levels: list[float]) -> dict[str, float]:
    """Spearman correlation of the last round's quality estimates with the hidden levels."""
    from scipy.stats import spearmanr

    rows = [r for _, r in sorted(history.items()) if "quality" in r]
    if not rows or len(set(levels)) < 2:
        return {}
    q = rows[-1]["quality"]
    pids = sorted(q, key=int)
    rho = spearmanr([q[p] for p in pids], [-levels[int(p)] for p in pids]).statistic
    return {"spearman_quality_vs_clean": float(rho)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value
    random.seed(derive_seed(cfg["seed"], 0x5E))
    num_partitions = len(wait_for_nodes(grid, timeout=60.0))
    partitions_of(cfg, num_partitions)  # one-line error if the data cannot be split so
    levels = levels_of(cfg, num_partitions)
    writer = ResultsWriter(output_dir(cfg["results-dir"], "fedqual"), cfg, app="fedqual")
    writer.set("client_levels", {str(p): lv for p, lv in enumerate(levels)})
    writer.set("num_partitions", num_partitions)
    evaluate = central_evaluator(cfg)
    strategy = cfg.method.strategy(
        cfg, evaluate_each=evaluate, fit=central_fit(cfg, num_partitions)
    )
    strategy = with_options(strategy, cfg, writer, num_partitions)
    result = run_method(
        strategy, grid, cfg, writer, initial_arrays(cfg), lambda rnd, arrays: evaluate(arrays)
    )
    final = result.evaluate_metrics_serverapp[cfg["num-server-rounds"]]
    writer.set("quality_vs_level", quality_vs_level(getattr(strategy, "history", {}), levels))
    label = (
        f"fedqual method={cfg['method']} dataset={cfg['dataset']} level={cfg['corruption-level']}"
    )
    finish(writer, {k: float(final[k]) for k in METRICS}, label, "kl", strategy)
