"""FedBone ServerApp: config, the strategy from the method table (with the server's general
model), run_strategy, finish."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbone.task import TorchGeneral, initial_arrays, parse_config, step_costs
from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method

APP = "fedbone"
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad key or value
    writer = ResultsWriter(output_dir(cfg["results-dir"], APP), cfg, app=APP)
    num_nodes = len(wait_for_nodes(grid))
    general = TorchGeneral(cfg) if cfg.method.flag("split") else None
    strategy = cfg.method.strategy(cfg, general=general, min_nodes=num_nodes)
    result = run_method(strategy, grid, cfg, writer, initial_arrays(cfg))
    final = {
        k: v
        for k, v in result.evaluate_metrics_clientapp.get(cfg["num-server-rounds"], {}).items()
        if k != "num-examples"
    }
    history = getattr(strategy, "history", {}).values()
    rates = [r["conflict_rate"] for r in history if "conflict_rate" in r]
    if rates:
        final["conflict_rate"] = sum(rates) / len(rates)
    final.update(step_costs(writer.record["rounds"], cfg["steps"]))
    final.update(writer.record["extra"]["totals"])
    finish(writer, final, f"{APP} {cfg['method']}", "cls_accuracy", strategy)
