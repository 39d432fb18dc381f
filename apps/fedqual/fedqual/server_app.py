"""FedQual ServerApp: FedQual (and ablations), FedAvg, FedProx, local-only and centralized runs.

All methods write the same ``results.json``: per-round server-side LDL measures on the clean test
split, per-round quality estimates / reliability weights / calibration weights (federated
methods), the hidden per-client corruption levels, and ``final`` = the six LDL measures.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedqual.ldl import METRICS
from fedqual.task import (
    FEDERATED,
    central_evaluator,
    fit,
    initial_arrays,
    levels_of,
    make_model,
    parse_config,
    partitions_of,
    pooled_data,
)
from flowerbed.common.records import content_nbytes, to_record
from flowerbed.common.results import ResultsWriter
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.server import output_dir, run_strategy
from flowerbed.common.train import get_device
from flowerbed.strategies.fedavg import FedAvg
from flowerbed.strategies.fedqual import FedQual, mean_train_metrics

INFO = 20
app = ServerApp()


def _nodes(grid: Grid, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not (nodes := sorted(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not nodes:
        raise RuntimeError(f"no SuperNode connected within {timeout:.0f} s")
    return nodes


def make_strategy(cfg: dict[str, Any]) -> FedAvg:
    """The strategy of a federated ``method``."""
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
        train_metrics_aggr_fn=mean_train_metrics,
    )
    m = cfg["method"]
    if m.startswith("fedqual"):
        return FedQual(
            reliability_power=cfg["reliability-power"],
            use_reliability=m != "fedqual-noweight",
            alpha_max=0.0 if m == "fedqual-nocal" else cfg["alpha-max"],
            **common,
        )
    return FedAvg(**common)


def quality_vs_level(history: dict, levels: list[float]) -> dict[str, float]:
    """Spearman correlation of the last round's quality estimates with the hidden levels."""
    from scipy.stats import spearmanr

    rows = [r for _, r in sorted(history.items()) if "quality" in r]
    if not rows or len(set(levels)) < 2:
        return {}
    q = rows[-1]["quality"]
    pids = sorted(q, key=int)
    rho = spearmanr([q[p] for p in pids], [-levels[int(p)] for p in pids]).statistic
    return {"spearman_quality_vs_clean": float(rho)}


def run_local(cfg, grid, nodes, writer, evaluate) -> dict[str, float]:
    """Local-only: every client trains its own model; the test measures are averaged."""
    arrays0 = initial_arrays(cfg)
    final: dict[str, float] = {}
    for rnd in range(1, cfg["num-server-rounds"] + 1):
        t0 = time.perf_counter()
        content = RecordDict({"arrays": arrays0, "config": ConfigRecord({"server-round": rnd})})
        msgs = [
            Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes
        ]
        replies = [r for r in grid.send_and_receive(msgs, timeout=3600) if not r.has_error()]
        if not replies:
            raise RuntimeError(f"local-only round {rnd}: no client replied without error")
        per_client = [evaluate(r.content["arrays"]) for r in replies]
        final = {m: float(np.mean([c[m] for c in per_client])) for m in METRICS}
        writer.add_round(
            rnd,
            round_time_s=round(time.perf_counter() - t0, 4),
            bytes_sent=content_nbytes(content) * len(nodes),
            bytes_received=sum(content_nbytes(r.content) for r in replies),
            num_train_replies=len(replies),
            quality={
                str(int(r.content["metrics"]["partition-id"])): r.content["metrics"]["quality"]
                for r in replies
            },
            **{f"server_{k}": v for k, v in final.items()},
        )
        log(INFO, "[flowerbed] local-only round %d: kl=%.4f", rnd, final["kl"])
    return final


def run_central(cfg, num_partitions, writer, evaluate, clean: bool) -> dict[str, float]:
    """Centralized: the pooled clients' data (clean or as annotated) trained on the server."""
    x, y = pooled_data(cfg, num_partitions, clean)
    model = make_model(cfg, x.shape[1], y.shape[1])
    writer.add_round(0, **{f"server_{k}": v for k, v in evaluate(to_record(model)).items()})
    res: dict[str, float] = {}
    for rnd in range(1, cfg["num-server-rounds"] + 1):
        t0 = time.perf_counter()
        loss = fit(
            model,
            x,
            y,
            epochs=cfg["local-epochs"],
            batch_size=cfg["batch-size"],
            lr=cfg["lr"],
            weight_decay=cfg["weight-decay"],
            generator=set_seed(derive_seed(cfg["seed"], 0xCE, rnd)),
            device=get_device(cfg["device"]),
        )
        res = evaluate(to_record(model))
        writer.add_round(
            rnd,
            round_time_s=round(time.perf_counter() - t0, 4),
            bytes_sent=0,
            bytes_received=0,
            train_loss=loss,
            **{f"server_{k}": v for k, v in res.items()},
        )
    log(INFO, "[flowerbed] %s: kl=%.4f", cfg["method"], res["kl"])
    return res


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value
    random.seed(derive_seed(cfg["seed"], 0x5E))
    nodes = _nodes(grid)
    num_partitions = len(nodes)
    partitions_of(cfg, num_partitions)  # one-line error if the data cannot be split so
    levels = levels_of(cfg, num_partitions)
    writer = ResultsWriter(output_dir(cfg["results-dir"], "fedqual"), cfg, app="fedqual")
    writer.set("client_levels", {str(p): lv for p, lv in enumerate(levels)})
    writer.set("num_partitions", num_partitions)
    evaluate = central_evaluator(cfg)
    method = cfg["method"]
    if method in FEDERATED:
        strategy = make_strategy(cfg)
        result = run_strategy(
            strategy,
            grid,
            initial_arrays(cfg),
            cfg["num-server-rounds"],
            writer,
            train_config=ConfigRecord({}),
            evaluate_fn=lambda rnd, arrays: MetricRecord(evaluate(arrays)),
        )
        final = dict(result.evaluate_metrics_serverapp.get(cfg["num-server-rounds"], {}))
        writer.set("quality_vs_level", quality_vs_level(strategy.history, levels))
    elif method == "local":
        final = run_local(cfg, grid, nodes, writer, evaluate)
    else:
        final = run_central(cfg, num_partitions, writer, evaluate, clean=method == "central-clean")
    writer.set("final", {k: float(final[k]) for k in METRICS})
    path = writer.write(final=True)
    print(
        f"[flowerbed] fedqual method={method} dataset={cfg['dataset']} "
        f"level={cfg['corruption-level']} final kl={final['kl']:.4f} "
        f"cosine={final['cosine']:.4f} -> {path}",
        flush=True,
    )
