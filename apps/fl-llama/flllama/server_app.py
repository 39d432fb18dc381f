"""FL-LLaMA ServerApp: config, the strategy from the method table (with the server's block B),
run_strategy, finish."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flllama.task import TorchServerBlock, central_fit, evaluator, initial_arrays, parse_config
from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method

APP = "fl-llama"
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad key or value
    writer = ResultsWriter(output_dir(cfg["results-dir"], APP), cfg, app=APP)
    num_nodes = len(wait_for_nodes(grid))
    init = initial_arrays(cfg)
    server = TorchServerBlock(cfg) if cfg.method.flag("split") else None
    hidden = server.replicas[0].hidden_size if server else 0
    strategy = cfg.method.strategy(
        cfg,
        min_nodes=num_nodes,
        server=server,
        hidden_size=hidden,
        fit=central_fit(cfg, num_nodes),
    )
    result = run_method(strategy, grid, cfg, writer, init, evaluator(cfg))
    final = dict(result.evaluate_metrics_serverapp.get(cfg["num-server-rounds"], {}))
    losses = getattr(strategy, "step_losses", [])
    if losses:
        final["train_loss_first_step"], final["train_loss_last_step"] = losses[0], losses[-1]
    final.update(writer.record["extra"]["totals"])
    finish(writer, final, f"{APP} {cfg['method']}", "loss", strategy)
