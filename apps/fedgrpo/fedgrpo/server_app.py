"""FedGRPO ServerApp: config, the policy and the strategy from the method table, run_strategy,
finish."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgrpo import domains as D
from fedgrpo.task import LoraPolicy, aux_set, evaluator, parse_config, round_prompts, warmup
from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import finish, output_dir, run_method

APP = "fedgrpo"
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad key or value
    writer = ResultsWriter(output_dir(cfg["results-dir"], APP), cfg, app=APP)
    num_nodes = len(wait_for_nodes(grid))
    policy = LoraPolicy(cfg)
    warm = warmup(cfg, policy)  # format warm-up on the server's auxiliary set (0 steps: none)
    strategy = cfg.method.strategy(
        cfg,
        policy=policy,
        scorer=D.exact_rewards,
        aux=aux_set(cfg["aux-per-domain"]),
        prompts=lambda rnd: round_prompts(cfg, rnd),
        min_nodes=num_nodes,
    )
    result = run_method(strategy, grid, cfg, writer, policy.arrays(), evaluator(cfg, policy))
    rounds = result.evaluate_metrics_serverapp
    final = dict(rounds.get(cfg["num-server-rounds"], {}))
    final.update({f"before_{k}": v for k, v in rounds.get(0, {}).items()})
    history = getattr(strategy, "history", {})
    per_prompt = [r["bytes_up_per_prompt"] for r in history.values() if "bytes_up_per_prompt" in r]
    if per_prompt:
        final["bytes_up_per_prompt"] = sum(per_prompt) / len(per_prompt)
        final["floats_up_per_prompt"] = cfg["num-experts"] * cfg["group-size"]
    if warm:
        final.update(warmup_loss_first=warm[0], warmup_loss_last=warm[-1])
    final.update(writer.record["extra"]["totals"])
    finish(writer, final, f"{APP} {cfg['method']}", "accuracy", strategy)
