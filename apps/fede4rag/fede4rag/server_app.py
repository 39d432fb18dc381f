"""FedE4RAG ServerApp: config, the strategy from the method table, run_strategy, finish."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fede4rag.task import central_fit, evaluator, initial_arrays, parse_config
from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method, with_options

APP = "fede4rag"
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad key or value
    writer = ResultsWriter(output_dir(cfg["results-dir"], APP), cfg, app=APP)
    num_nodes = len(wait_for_nodes(grid))
    init = initial_arrays(cfg)
    evaluate = evaluator(cfg)
    strategy = cfg.method.strategy(
        cfg,
        num_values=sum(init[k].numpy().size for k in init),
        min_nodes=num_nodes,
        evaluate_each=evaluate,
        fit=central_fit(cfg, num_nodes),
    )
    strategy = with_options(strategy, cfg, writer, num_nodes)

    def server_eval(rnd, arrays):
        # under CKKS the server holds no plaintext model after round 0: the evaluator client
        # reports the metrics (EncryptedMean's server_metrics)
        return evaluate(arrays) if rnd == 0 or not cfg["he"] else None

    result = run_method(strategy, grid, cfg, writer, init, server_eval)
    final = dict(result.evaluate_metrics_serverapp.get(cfg["num-server-rounds"], {}))
    final.update(writer.record["extra"].get("totals", {}))
    finish(writer, final, f"{APP} {cfg['method']}", "mrr", strategy)
