"""TOF distillation ServerApp: config, the strategy from the method table, run_strategy, finish."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method
from tofdistill.domains import TASKS
from tofdistill.flowchart import quality
from tofdistill.task import PooledRaw, due, evaluate, initial_arrays, parse_config

APP = "tof-distillation"
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad key or value
    writer = ResultsWriter(output_dir(cfg["results-dir"], APP), cfg, app=APP)
    num_nodes = len(wait_for_nodes(grid))
    pooled = PooledRaw(cfg, num_nodes)

    def each(rnd, arrays, chart):  # local-only: one client's adapter with its own chart
        return evaluate(cfg, arrays, chart) if due(cfg, rnd) else None

    strategy = cfg.method.strategy(cfg, evaluate_each=each, fit=pooled.fit)
    serving = getattr(strategy, "serving_chart", pooled.serving_chart)

    def server_eval(rnd, arrays):
        return evaluate(cfg, arrays, serving()) if due(cfg, rnd) and rnd > 0 else None

    result = run_method(strategy, grid, cfg, writer, initial_arrays(cfg), server_eval)
    final = dict(result.evaluate_metrics_serverapp.get(cfg["num-server-rounds"], {}))
    if serving() is not None:
        final.update({f"chart_{k}": v for k, v in quality(serving(), TASKS).items()})
    first = getattr(strategy, "history", {}).get(1, {})
    final.update({k: v for k, v in first.items() if k.startswith("flowchart_")})
    final.update(writer.record["extra"]["totals"])
    finish(writer, final, f"{APP} {cfg['method']}", "success", strategy)
