"""Mixed FL ServerApp: config, the server's data, strategy from the method table, run, final line."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method, with_options
from mixedfl import client_app, offload  # noqa: F401  (client_app: imported before the engine loads it)
from mixedfl.task import ServerSide, central_fit, evaluator, initial_arrays, parse_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad key or value
    writer = ResultsWriter(output_dir(cfg["results-dir"], "mixed-fl"), cfg, app="mixed-fl")
    num_nodes = len(wait_for_nodes(grid))
    if cfg.method.flag("scenario") == "offload":  # MovieLens item table, spreadout f_c
        evaluate, start, headline = offload.evaluator(cfg), offload.initial_arrays(cfg), "recall@10"
        strategy = cfg.method.strategy(cfg)
    else:  # blending
        evaluate, start, headline = evaluator(cfg), initial_arrays(cfg), "accuracy"
        server_data = ServerSide(cfg) if cfg.method.flag("server-data") else None
        fit = central_fit(cfg, num_nodes, cfg.method.flag("central-data", "server"))
        strategy = cfg.method.strategy(cfg, server_data=server_data, fit=fit)
    strategy = with_options(strategy, cfg, writer, num_nodes)
    result = run_method(strategy, grid, cfg, writer, start, lambda rnd, arrays: evaluate(arrays))
    final = result.evaluate_metrics_serverapp.get(cfg["num-server-rounds"], {})
    finish(writer, final, f"mixed-fl {cfg['method']}", headline, strategy)
