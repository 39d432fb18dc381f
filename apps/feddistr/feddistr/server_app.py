"""FedDistr ServerApp: one upload round, alignment, synthesis, training (or a baseline).

``method = "feddistr"``: the server sends ONE ``train`` message to every node (the Grid, no
FedAvg loop), receives each client's base distributions, aligns them
(:func:`feddistr.align.consolidate`), generates a synthetic labelled set with the shared
diffusion model, trains the global classifier on it and evaluates it on the real test split.
``fedavg`` / ``fedprox``: the flowerbed FedAvg strategy for ``num-server-rounds`` rounds on the
same partitions. ``centralized``: the classifier trained on the pooled private data.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from feddistr.align import Dist, consolidate
from feddistr.task import (
    check_upload,
    gen_config,
    label_histograms,
    make_model,
    parse_config,
    private_pool,
    save_grid,
    test_data,
)
from flowerbed.common.records import content_nbytes, record_nbytes, to_record
from flowerbed.common.results import ResultsWriter
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.server import output_dir, run_strategy
from flowerbed.common.train import evaluate, get_device, train

INFO, WARNING = 20, 30
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Boot")  # fmt: skip

app = ServerApp()


def _nodes(grid: Grid) -> list[int]:
    while not (nodes := sorted(grid.get_node_ids())):
        time.sleep(0.5)
    return nodes


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)  # far faster than 2 threads on a shared 2-core machine
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value
    nodes = _nodes(grid)
    if cfg["partition"] != "entangled" and len(nodes) > 10:
        raise ValueError(f"partition {cfg['partition']!r} needs <= 10 clients, got {len(nodes)}")
    writer = ResultsWriter(output_dir(cfg["results-dir"], "feddistr"), cfg, app="feddistr")
    writer.set("label_histograms", label_histograms(cfg, len(nodes)))
    run = {"feddistr": run_feddistr, "centralized": run_centralized}.get(cfg["method"], run_fedavg)
    final = run(grid, cfg, writer, nodes)
    writer.set("final", final)
    path = writer.write(final=True)
    print(
        f"[flowerbed] feddistr method={cfg['method']} partition={cfg['partition']} "
        f"accuracy {final['accuracy']:.4f} bytes {final['bytes_total']} -> {path}",
        flush=True,
    )


def _fit_classifier(cfg, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    model = make_model(cfg)
    g = set_seed(derive_seed(cfg["seed"], 0xC1A5))
    train(
        model,
        x,
        y,
        epochs=cfg["server-epochs"],
        batch_size=64,
        lr=cfg["lr"],
        momentum=0.9,
        generator=g,
        device=get_device(cfg["device"]),
    )
    xt, yt = test_data(cfg)
    return model, evaluate(model, xt, yt, device=get_device(cfg["device"]))


def run_feddistr(grid: Grid, cfg, writer: ResultsWriter, nodes: list[int]) -> dict:
    from feddistr.generator import load_or_build, sample

    t0 = time.perf_counter()
    gcfg = gen_config(cfg)
    gen = load_or_build(gcfg, cfg["data-dir"])  # built once here, clients load the cache
    content = RecordDict({"config": ConfigRecord({"server-round": 1, "method": "feddistr"})})
    msgs = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
    sent = content_nbytes(content) * len(nodes)
    received, uploads, rejected = 0, [], 0
    for rep in grid.send_and_receive(msgs, timeout=3600):
        if rep.has_error():
            log(WARNING, "[feddistr] node %s failed: %s", rep.metadata.src_node_id, rep.error)
            rejected += 1
            continue
        received += content_nbytes(rep.content)
        arrays = {k: v.numpy() for k, v in rep.content["arrays"].items()}
        why = check_upload(arrays, gcfg.cond_dim)
        if why:
            log(WARNING, "[feddistr] upload of node %s rejected: %s", rep.metadata.src_node_id, why)
            rejected += 1
            continue
        pid = int(rep.content["metrics"]["partition-id"])
        dists = [
            Dist(
                arrays["mean"][i],
                arrays["logstd"][i],
                int(arrays["label"][i]),
                int(arrays["count"][i]),
                [pid],
            )  # fmt: skip
            for i in range(len(arrays["label"]))
        ]
        uploads.append((pid, dists))
    if not uploads:
        raise RuntimeError("feddistr: no valid client upload")
    uploads.sort(key=lambda u: u[0])
    consolidated, merges = consolidate(
        [d for _, d in uploads], cfg["match-threshold"], cfg["match-same-label"]
    )
    t_comm = time.perf_counter() - t0
    # synthetic set: synthetic-per-class images per class, split by count among its dists
    g = torch.Generator().manual_seed(derive_seed(cfg["seed"], 0xD1))
    xs, ys = [], []
    for c in sorted({d.label for d in consolidated}):
        dists = [d for d in consolidated if d.label == c]
        total = sum(d.count for d in dists)
        for d in dists:
            n = max(1, round(cfg["synthetic-per-class"] * d.count / total))
            xs.append(
                sample(
                    gen,
                    torch.from_numpy(np.asarray(d.mean, np.float32)),
                    torch.from_numpy(np.asarray(d.logstd, np.float32)),
                    n,
                    ddim_steps=cfg["ddim-steps"],
                    guidance=cfg["guidance"],
                    generator=g,
                )
            )
            ys.append(torch.full((n,), c, dtype=torch.long))
    x_syn, y_syn = torch.cat(xs), torch.cat(ys)
    t_gen = time.perf_counter() - t0 - t_comm
    out = writer.out_dir
    if cfg["save-samples"]:
        rows = [x_syn[y_syn == c][:10] for c in sorted(set(y_syn.tolist()))]
        names = [CLASSES[c] for c in sorted(set(y_syn.tolist()))]
        writer.set("samples_png", str(save_grid(rows, out / "synthetic_samples.png", names)))
    model, metrics = _fit_classifier(cfg, x_syn, y_syn)
    model_bytes = record_nbytes(to_record(model))
    final = {
        **metrics,
        "rounds": 1,
        "bytes_sent": sent,
        "bytes_received": received,
        "bytes_total": sent + received,
        "bytes_with_model_delivery": sent + received + model_bytes * len(nodes),
        "num_uploaded": sum(len(d) for _, d in uploads),
        "num_consolidated": len(consolidated),
        "num_merges": merges,
        "num_rejected": rejected,
        "synthetic_size": len(y_syn),
        "time_upload_s": round(t_comm, 2),
        "time_generate_s": round(t_gen, 2),
    }
    writer.add_round(1, **final)
    writer.set(
        "consolidated",
        [{"label": d.label, "count": d.count, "sources": d.sources} for d in consolidated],
    )
    return final


def run_fedavg(grid: Grid, cfg, writer: ResultsWriter, nodes: list[int]) -> dict:
    from flowerbed.strategies.fedavg import FedAvg

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=len(nodes),
    )
    xt, yt = test_data(cfg)
    model = make_model(cfg)
    device = get_device(cfg["device"])

    def evaluate_fn(rnd, arrays):
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord(evaluate(model, xt, yt, device=device))

    R = cfg["num-server-rounds"]
    result = run_strategy(
        strategy,
        grid,
        to_record(model),
        R,
        writer,
        train_config=ConfigRecord({"method": cfg["method"]}),
        evaluate_fn=evaluate_fn,
    )
    final: dict = {"rounds": R}
    cum = 0
    for rnd in range(1, R + 1):
        h = strategy.history.get(rnd, {})
        cum += h.get("bytes_sent", 0) + h.get("bytes_received", 0)
        acc = result.evaluate_metrics_serverapp.get(rnd, {}).get("accuracy", float("nan"))
        if rnd in (1, 10, 50) or rnd == R:
            final[f"accuracy_r{rnd}"] = float(acc)
            final[f"bytes_total_r{rnd}"] = cum
    final["accuracy"] = final[f"accuracy_r{R}"]
    final["loss"] = float(result.evaluate_metrics_serverapp.get(R, {}).get("loss", float("nan")))
    final["bytes_total"] = cum
    return final


def run_centralized(grid: Grid, cfg, writer: ResultsWriter, nodes: list[int]) -> dict:
    x, y = private_pool(cfg)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    _, metrics = _fit_classifier(cfg, x, y)
    # communication of centralised training = uploading the raw data (float32 arrays)
    nbytes = int(x.numel() * 4 + y.numel() * 8)
    final = {**metrics, "rounds": 0, "bytes_total": nbytes}
    writer.add_round(0, **final)
    return final
