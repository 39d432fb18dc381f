"""FedTA ServerApp: the federated continual-learning schedule (tasks x rounds per task).

For every task ``t`` it runs ``rounds-per-task`` training rounds through the strategy
(:class:`flowerbed.strategies.fedta.FedTA` for the FedTA methods, flowerbed's guarded
:class:`~flowerbed.strategies.fedavg.FedAvg` for the baselines) with ``task = t`` in the train
config, then one evaluation round on the clients' local test sets. ``results.json`` gets one row
per round (task, bytes, upload per client, train metrics, evaluation metrics after each task) and
``final``: ``acc_t1..acc_tT``, ``kr_t``, ``kr_s``, ``upload_bytes_per_client_round``.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedta import data as D
from fedta import task as T
from fedta.pretrain import load_backbone
from flowerbed.common.records import record_nbytes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import output_dir
from flowerbed.strategies.fedavg import FedAvg
from flowerbed.strategies.fedta import FedTA

app = ServerApp()
INFO = 20


def make_strategy(cfg, backbone):
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }
    if cfg["method"] not in T.FEDTA_METHODS:
        return FedAvg(**common)
    s = D.slices(cfg["data-dir"], cfg["pretrain-size"], cfg["surrogate-per-class"])
    x_sur, _ = D.tensors_at(cfg["data-dir"], s["surrogate"])
    return FedTA(
        backbone=backbone,
        x_surrogate=x_sur,
        num_classes=T.NUM_CLASSES,
        top_n=cfg["top-n"],
        use_sikf=cfg["method"] != "fedta-no-sikf",
        sikf_steps=cfg["sikf-steps"],
        sikf_lr=cfg["sikf-lr"],
        use_bgps=cfg["method"] != "fedta-no-bgps",
        bgps_thr=cfg["bgps-thr"],
        seed=cfg["seed"],
        **common,
    )


def final_metrics(evals: list[dict[int, dict]], uploads: list[float], values: int) -> dict:
    """``acc_t<k>`` (mean over clients after task k), KR_t, KR_s and the upload per round."""
    final: dict[str, float] = {}
    for t, per in enumerate(evals):
        final[f"acc_t{t + 1}"] = float(np.mean([m["acc"] for m in per.values()]))
    first = {i: m["acc_first"] for i, m in evals[0].items()}
    last = evals[-1]
    final["kr_t"] = T.kr_t(first, {i: m["acc_first"] for i, m in last.items()})
    final["kr_s"] = T.kr_s(
        {i: m["acc_cur_global"] for i, m in last.items()},
        {i: m["acc_cur_local"] for i, m in last.items() if "acc_cur_local" in m},
    )
    final["accuracy"] = final[f"acc_t{len(evals)}"]
    final["upload_bytes_per_client_round"] = float(np.mean(uploads)) if uploads else 0.0
    final["upload_values_per_client_round"] = float(values)
    return final


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = T.parse_config(context.run_config)  # fails fast, naming the bad value
    writer = ResultsWriter(output_dir(cfg["results-dir"], "fedta"), cfg, app="fedta")
    backbone = load_backbone(cfg)  # built here (once) if the checkpoint is missing
    strategy = make_strategy(cfg, backbone)
    strategy.summary()
    arrays = T.record_of(T.initial_global(cfg, backbone))
    seen: set[int] = set()
    evals: list[dict[int, dict]] = []
    uploads: list[float] = []
    upload_values = 0
    rnd = 0
    for task in range(cfg["num-tasks"]):
        for r in range(cfg["rounds-per-task"]):
            rnd += 1
            t0 = time.perf_counter()
            config = ConfigRecord(
                {"task": task, "round-in-task": r, "bgps-freeze": r >= cfg["bgps-warmup"]}
            )
            msgs = list(strategy.configure_train(rnd, arrays, config, grid))
            replies = list(grid.send_and_receive(msgs, timeout=3600))
            ok = [m for m in replies if not m.has_error()]
            sizes = [record_nbytes(m.content) for m in ok]
            uploads += sizes
            for m in ok:
                if "info" in m.content.config_records:
                    seen.update(T.as_list(m.content["info"]["classes"]))
                upload_values = max(
                    upload_values,
                    sum(
                        int(np.prod(a.shape))
                        for rec in m.content.array_records.values()
                        for a in rec.values()
                    ),
                )
            new, metrics = strategy.aggregate_train(rnd, replies)
            if new is not None:
                arrays = new
            row = {"task": task, **strategy.history.get(rnd, {})}
            row["upload_bytes_per_client"] = float(np.mean(sizes)) if sizes else 0.0
            row.update({f"train_{k}": v for k, v in (metrics or {}).items() if k != "pid"})
            row["round_time_s"] = round(time.perf_counter() - t0, 3)
            writer.add_round(rnd, **row)
        # ---- evaluation after the task
        config = ConfigRecord({"task": task, "seen-classes": sorted(seen)})
        msgs = list(strategy.configure_evaluate(rnd, arrays, config, grid))
        replies = strategy.filter_replies(
            rnd, grid.send_and_receive(msgs, timeout=3600), is_train=False
        )
        per = {int(m.content["metrics"]["pid"]): dict(m.content["metrics"]) for m in replies}
        evals.append(per)
        acc = float(np.mean([m["acc"] for m in per.values()])) if per else float("nan")
        writer.add_round(
            rnd,
            eval_task=task,
            acc=acc,
            per_client={str(i): {k: v for k, v in m.items() if k != "pid"} for i, m in per.items()},
        )
        log(
            INFO,
            "[fedta] %s task %d/%d: accuracy %.4f",
            cfg["method"],
            task + 1,
            cfg["num-tasks"],
            acc,
        )
    if getattr(strategy, "frozen", None) is not None:
        writer.set("frozen_classes", sorted(strategy.frozen))
    final = final_metrics(evals, uploads, upload_values)
    writer.set("final", final)
    path = writer.write(final=True)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in final.items())
    print(f"[flowerbed] fedta {cfg['method']}: {shown} -> {path}", flush=True)
