"""PrivFusion ServerApp: the method's strategy on the protocol layer, the results file.

``method = "privfusion"``: :class:`flowerbed.strategies.privfusion.PrivFusion`, the relay of the
decentralized fusion protocol (one round, three phases) with the app's evaluation harness;
``method = "fedavg"``: the FedAvg baseline from scratch for ``num-server-rounds`` rounds. The
method table is :mod:`privfusion.methods`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method
from privfusion.task import global_evaluator, initial_arrays, parse_config

APP = "privfusion"
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value, before any work
    # one-shot protocol: a party connecting late would be left out, so wait for a stable set
    nodes = wait_for_nodes(grid, 1, settle_s=5.0)
    cfg = parse_config(context.run_config, len(nodes))  # fusing-party < parties, before any work
    writer = ResultsWriter(output_dir(cfg["results-dir"], APP), cfg, app=APP)
    one_shot = cfg.method.flag("one-shot", False)
    rounds = 1 if one_shot else cfg["num-server-rounds"]
    strategy = cfg.method.strategy(cfg)
    result = run_method(
        strategy,
        grid,
        cfg,
        writer,
        initial_arrays(cfg, one_shot),
        None if one_shot else global_evaluator(cfg),
        rounds,
    )
    prefix = cfg.method.flag("final-prefix", "")
    last = result.evaluate_metrics_serverapp.get(rounds, {})
    final = {f"{prefix}{k}": float(v) for k, v in last.items()}
    if hasattr(strategy, "final_metrics"):
        final.update(strategy.final_metrics())
    if getattr(strategy, "parties", None):
        writer.set("parties", {str(p): m for p, m in strategy.parties.items()})
    final.update(writer.record["extra"]["totals"])
    final["protocol_time_s"] = sum(
        r.get("round_time_s", 0.0) for r in writer.record["rounds"] if r["round"] > 0
    )
    finish(writer, final, f"{APP} {cfg['method']}", cfg.method.flag("headline"), strategy)
