"""stockfmnist: a Flower / PyTorch ServerApp (as in Flower's quickstart-pytorch).

The only addition: with ``results-dir`` set, the round times and metrics are written to
``<results-dir>/results.json`` for the benchmark (the rows have the keys of flowerbed's results
file that the benchmark reads).
"""

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from stockfmnist.task import Net, load_centralized_dataset, test

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    # Read run config
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]
    data_dir: str = context.run_config["data-dir"]

    # Load global model
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize FedAvg strategy
    strategy = FedAvg(fraction_train=fraction_train, fraction_evaluate=0.0)

    rounds: list[dict] = []
    t_last = [time.perf_counter()]

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Evaluate model on central data."""
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        test_loss, test_acc = test(model, load_centralized_dataset(data_dir), device)
        now = time.perf_counter()
        rounds.append(
            {"round": server_round, "round_time_s": now - t_last[0], "server_accuracy": test_acc}
        )
        t_last[0] = now
        return MetricRecord({"accuracy": test_acc, "loss": test_loss})

    # Start strategy, run FedAvg for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
        evaluate_fn=global_evaluate,
    )

    if context.run_config["results-dir"]:
        for row in rounds:
            for k, v in result.train_metrics_clientapp.get(row["round"], {}).items():
                row[f"train_{k}"] = v
        final = dict(result.evaluate_metrics_serverapp.get(num_rounds, {}))
        out = Path(context.run_config["results-dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(
            json.dumps({"app": "stockfmnist", "rounds": rounds, "extra": {"final": final}})
        )
