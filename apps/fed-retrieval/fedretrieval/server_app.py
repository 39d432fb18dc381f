"""fed-retrieval ServerApp: config, strategy from the method table, run, final line."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedretrieval import client_app  # noqa: F401  (imported before the engine loads it)
from fedretrieval.task import central_fit, describe, evaluator, initial_arrays, parse_config
from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method, with_options

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad key or value
    writer = ResultsWriter(
        output_dir(cfg["results-dir"], "fed-retrieval"), cfg, app="fed-retrieval"
    )
    writer.set("data", describe(cfg))
    num_nodes = len(wait_for_nodes(grid))
    evaluate = evaluator(cfg)
    strategy = with_options(cfg.method.strategy(cfg, fit=central_fit(cfg)), cfg, writer, num_nodes)
    result = run_method(
        strategy, grid, cfg, writer, initial_arrays(cfg), lambda rnd, arrays: evaluate(arrays)
    )
    final = result.evaluate_metrics_serverapp.get(cfg["num-server-rounds"], {})
    finish(writer, final, f"fed-retrieval {cfg['method']}", "recall@10", strategy)
