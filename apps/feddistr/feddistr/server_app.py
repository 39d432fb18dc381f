"""FedDistr ServerApp: the method's strategy (from the method table), run, final metrics.

``feddistr`` (and its ablation) is the one-shot :class:`~flowerbed.strategies.feddistr.FedDistr`
strategy (one round, whatever ``num-server-rounds``: the method table's ``rounds`` flag);
``fedavg`` / ``fedprox`` run ``num-server-rounds`` rounds on the same partitions (accuracy and
cumulative bytes also kept at rounds 1, 10 and 50); ``centralized`` trains on the pooled data.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from feddistr.task import (
    central_evaluator,
    fit_classifier,
    gen_config,
    label_histograms,
    make_model,
    parse_config,
    private_pool,
    save_grid,
)
from flowerbed.common.protocol import wait_for_nodes
from flowerbed.common.records import to_record, wire_nbytes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.seeding import derive_seed
from flowerbed.common.server import finish, output_dir, run_strategy

CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Boot")  # fmt: skip
MILESTONES = (1, 10, 50)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)  # far faster than 2 threads on a shared 2-core machine
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value
    nodes = wait_for_nodes(grid)
    writer = ResultsWriter(output_dir(cfg["results-dir"], "feddistr"), cfg, app="feddistr")
    writer.set("label_histograms", label_histograms(cfg, len(nodes)))  # checks the partitioner
    rounds = cfg.method.flag("rounds", cfg["num-server-rounds"])
    # every factory of the table takes the server pieces it needs, by keyword
    strategy = cfg.method.strategy(cfg, **server_pieces(cfg, writer))
    result = run_strategy(
        strategy,
        grid,
        to_record(make_model(cfg)),
        rounds,
        writer,
        train_config=ConfigRecord({}),
        evaluate_fn=central_evaluator(cfg),
        timeout=cfg["round-timeout"],
    )
    final = final_metrics(writer, result, rounds)
    if cfg.method.flag("model_delivery"):
        model_bytes = wire_nbytes(RecordDict({"arrays": result.arrays}))
        final["bytes_with_model_delivery"] = final["bytes_total"] + model_bytes * len(nodes)
    if cfg.method.flag("raw_upload"):  # centralized: the raw float32 images and int64 labels
        x, y = private_pool(cfg)
        final["bytes_raw_upload"] = int(x.size * 4 + y.size * 8)
        final["bytes_total"] += final["bytes_raw_upload"]
    final.update(
        {
            k: v
            for k, v in getattr(strategy, "history", {}).get(rounds, {}).items()
            if isinstance(v, int | float)
        }  # fmt: skip
    )
    if hasattr(strategy, "consolidated"):
        writer.set(
            "consolidated",
            [
                {"label": d.label, "count": d.count, "sources": d.sources}
                for d in strategy.consolidated
            ],
        )
    label = f"feddistr method={cfg['method']} partitioner={cfg['partitioner']}"
    finish(writer, final, label, "accuracy", strategy)


def server_pieces(cfg, writer: ResultsWriter) -> dict:
    """The app-specific callables of the strategies: the shared generator (loaded, or
    pre-trained with progress lines, before the clients are called), its sampler, the
    classifier step on the synthetic set, and centralized training on the pooled data."""
    from feddistr.generator import load_or_build, sample

    gcfg = gen_config(cfg)
    state = {}

    def prepare() -> None:
        print(f"[feddistr] loading the shared generator ({gcfg.tag()})", flush=True)
        state["gen"] = load_or_build(gcfg, cfg["data-dir"], log_every=50)
        state["rng"] = torch.Generator().manual_seed(derive_seed(cfg["seed"], 0xD1))

    def sample_fn(mean, logstd, n: int) -> torch.Tensor:
        return sample(
            state["gen"],
            torch.from_numpy(np.asarray(mean, np.float32)),
            torch.from_numpy(np.asarray(logstd, np.float32)),
            n,
            ddim_steps=cfg["ddim-steps"],
            guidance=cfg["guidance"],
            generator=state["rng"],
        )

    def train_classifier(xs, ys):
        x, y = torch.cat(xs), torch.tensor(ys, dtype=torch.long)
        if cfg["save-samples"]:
            classes = sorted(set(ys))
            rows = [x[y == c][:10] for c in classes]
            path = save_grid(
                rows, writer.out_dir / "synthetic_samples.png", [CLASSES[c] for c in classes]
            )
            writer.set("samples_png", str(path))
        return fit_classifier(cfg, x, y)

    def fit_pooled(server_round: int, arrays):
        x, y = private_pool(cfg)
        return fit_classifier(cfg, torch.from_numpy(x), torch.from_numpy(y), arrays), {}

    return {
        "cond_dim": gcfg.cond_dim,
        "prepare": prepare,
        "sample": sample_fn,
        "train_classifier": train_classifier,
        "fit": fit_pooled,
    }


def final_metrics(writer: ResultsWriter, result, rounds: int) -> dict:
    """Accuracy and loss of the last round, the protocol's bytes, and accuracy / cumulative
    bytes at rounds 1, 10 and 50 (those reached)."""
    server = result.evaluate_metrics_serverapp
    final = {k: float(v) for k, v in server.get(rounds, {}).items()}
    final["rounds"] = rounds
    cum = 0
    for row in writer.record["rounds"]:
        cum += row.get("bytes_sent", 0) + row.get("bytes_received", 0)
        r = row["round"]
        if r in MILESTONES or r == rounds:
            final[f"accuracy_r{r}"] = float(server.get(r, {}).get("accuracy", float("nan")))
            final[f"bytes_total_r{r}"] = cum
    totals = writer.record["extra"].get("totals", {})
    final["bytes_sent"] = totals.get("bytes_sent", 0)
    final["bytes_received"] = totals.get("bytes_received", 0)
    final["bytes_total"] = final["bytes_sent"] + final["bytes_received"]
    return final
