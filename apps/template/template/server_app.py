"""Template ServerApp: config, strategy from the method table, run, final line."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flowerbed.common.participation import final_gaps, with_participation
from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method, with_options
from template.task import central_fit, evaluator, initial_arrays, parse_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad key or value
    writer = ResultsWriter(output_dir(cfg["results-dir"], "template"), cfg, app="template")
    num_nodes = len(wait_for_nodes(grid))
    evaluate = evaluator(cfg)
    # the factories take what they need: LocalOnly evaluate_each, Centralized fit
    strategy = cfg.method.strategy(cfg, evaluate_each=evaluate, fit=central_fit(cfg, num_nodes))
    strategy = with_participation(strategy, cfg)  # off unless unparticipating-fraction > 0
    strategy = with_options(strategy, cfg, writer, num_nodes)
    result = run_method(
        strategy, grid, cfg, writer, initial_arrays(cfg), lambda rnd, arrays: evaluate(arrays)
    )
    final = dict(result.evaluate_metrics_serverapp.get(cfg["num-server-rounds"], {}))
    final.update(final_gaps(result, cfg["num-server-rounds"]))  # the gap columns, when on
    finish(writer, final, f"template {cfg['method']}", "accuracy", strategy)
