"""FedIDM ServerApp: config, the method's strategy under the run's attack, run, final line."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedidm.task import evaluator, initial_arrays, parse_config, run_summary
from flowerbed.common.attacks import with_attack
from flowerbed.common.data import load_dataset
from flowerbed.common.participation import final_gaps, with_participation
from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method, with_options

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad key or value
    writer = ResultsWriter(output_dir(cfg["results-dir"], "fedidm"), cfg, app="fedidm")
    num_nodes = len(wait_for_nodes(grid))
    classes = load_dataset(cfg["dataset"], cfg["data-dir"] or None, mmap=True).num_classes
    strategy = cfg.method.strategy(cfg, num_nodes=num_nodes, num_classes=classes)
    strategy = with_participation(strategy, cfg)  # participation gap: off unless configured
    strategy = with_options(with_attack(strategy, cfg), cfg, writer, num_nodes)
    evaluate = evaluator(cfg)
    result = run_method(
        strategy, grid, cfg, writer, initial_arrays(cfg), lambda rnd, arrays: evaluate(arrays)
    )
    acc = [
        result.evaluate_metrics_serverapp[r]["accuracy"]
        for r in sorted(result.evaluate_metrics_serverapp)
        if r > 0
    ]
    final = dict(result.evaluate_metrics_serverapp.get(cfg["num-server-rounds"], {}))
    final.update(run_summary(acc, getattr(strategy, "history", {})))
    final.update(final_gaps(result, cfg["num-server-rounds"]))  # the gap columns, when on
    finish(writer, final, f"fedidm {cfg['method']} attack={cfg['attack']}", "accuracy", strategy)
