"""Match-and-merge ServerApp: config, N-best sets, the strategy from the method table,
run_strategy, finish."""

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method
from matchmerge.nbest import nbest_sets
from matchmerge.task import parse_config

APP = "match-and-merge"
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad key or value
    writer = ResultsWriter(output_dir(cfg["results-dir"], APP), cfg, app=APP)
    dev, test = nbest_sets(cfg)
    num_nodes = len(wait_for_nodes(grid))
    strategy = cfg.method.strategy(cfg, dev=dev, test=test, min_nodes=num_nodes)
    result = run_method(strategy, grid, cfg, writer, ArrayRecord())
    final = dict(result.evaluate_metrics_serverapp.get(1, {}))
    finish(writer, final, f"{APP} {cfg['method']}", "cer", strategy)
