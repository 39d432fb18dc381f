"""FedTA ServerApp: the method's strategy on the continual schedule, run, final metrics.

The schedule (task of each round, evaluation after each task, KR_t / KR_s) is the strategy's
(:mod:`flowerbed.strategies.fedta`); ``results.json`` gets one row per round (task, bytes, train
metrics, the evaluation after each task with per-client values) and ``final``: ``acc_t1..acc_tT``,
``kr_t``, ``kr_s``, ``upload_bytes_per_client_round``.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedta import data as D

# The method table imports fedta.client_app. Imported here, it loads while Flower imports this
# module under its import lock; imported later from the running ServerApp (parse_config), it can
# race the simulation engine's load of the ClientApp in another thread, and Flower's load_app
# then takes the half-imported module from sys.modules ("partially initialized module
# 'fedta.client_app' has no attribute 'app'"; seen in CI, 1 run in 3).
from fedta import methods as _methods  # noqa: F401
from fedta import task as T
from fedta.pretrain import load_backbone
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = T.parse_config(context.run_config)  # fails fast, naming the bad value
    T.one_thread()  # bitwise reproducible runs (see fedta.task.one_thread)
    writer = ResultsWriter(output_dir(cfg["results-dir"], "fedta"), cfg, app="fedta")
    backbone = load_backbone(cfg)  # built here (once) if the checkpoint is missing
    strategy = cfg.method.strategy(cfg, backbone=backbone, x_surrogate=D.surrogate(cfg))
    initial = T.record_of(T.initial_global(cfg, backbone))
    run_method(strategy, grid, cfg, writer, initial)
    if getattr(strategy, "frozen", None) is not None:
        writer.set("frozen_classes", sorted(strategy.frozen))
    finish(writer, strategy.final_metrics(), f"fedta {cfg['method']}", "accuracy", strategy)
