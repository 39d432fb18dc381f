"""PrivFusion ClientApp: one party of the decentralized fusion protocol.

Message types (the ServerApp only relays them between parties):

``train.local``  train the party's model with DP-SGD (Opacus), keep it in ``context.state``, and
                 release its weights (DP through DP-SGD) and its perturbed activation profiles.
``train.align``  receive the reference party's released package, match this party's neurons to
                 it by graph matching on the perturbed statistics only, and release the aligned
                 weights.
``train.fuse``   (fusing party) average the aligned models and train the perturbation filter
                 adapter on its own data with DP-SGD; release the fused model and the adapter.
``train``        the method's client step (``cfg.method.client``: the FedAvg baseline's SGD).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerbed.common.client import add_partition_query, partition_of
from flowerbed.common.records import to_record
from flowerbed.common.seeding import derive_seed
from privfusion.matching import average_layers, match, permute_layers
from privfusion.task import (
    act_sigma,
    activation_stats,
    budget,
    layers_of,
    layers_record,
    make_model,
    parse_config,
    party_data,
    record_layers,
    reliable_classes,
    set_layers,
    train_adapter,
    train_party,
)

app = ClientApp()
add_partition_query(app)


def _acts_record(acts: list[np.ndarray], counts: np.ndarray) -> ArrayRecord:
    rec = {f"act.{i}": torch.from_numpy(a.astype(np.float32)) for i, a in enumerate(acts)}
    rec["counts"] = torch.from_numpy(np.asarray(counts, dtype=np.float32))
    return ArrayRecord(rec)


def _acts(record: ArrayRecord) -> tuple[list[np.ndarray], np.ndarray]:
    n = sum(1 for k in record if k.startswith("act."))
    acts = [record[f"act.{i}"].numpy().astype(np.float64) for i in range(n)]
    return acts, record["counts"].numpy().astype(np.float64)


def _finite(metrics: dict) -> dict:
    return {k: (v if math.isfinite(v) else -1.0) for k, v in metrics.items()}


@app.train("local")
def local(msg: Message, context: Context) -> Message:
    """Step 1: DP-SGD training and release of the perturbed statistics."""
    pid, n = partition_of(context)
    cfg = parse_config(context.run_config, n)
    torch.set_num_threads(1)
    model, info = train_party(cfg, pid, n)
    x, y, nc = party_data(cfg, pid, n)
    b = budget(cfg, pid == cfg["fusing-party"])
    acts, counts, ainfo = activation_stats(
        model,
        x,
        y,
        nc,
        cfg["act-samples"],
        b["act"],
        b["delta_act"],
        derive_seed(cfg["seed"], pid, 4),
    )
    weights = layers_record(layers_of(model))
    # the party keeps its model and its own released statistics for the matching step
    context.state["model"] = weights
    context.state["acts"] = _acts_record(acts, counts)
    eps_spent = info["epsilon"] + b["act"]
    metrics = {
        "partition-id": pid,
        "num-examples": info["num-examples"],
        "eps_sgd": info["epsilon"],
        "eps_act": b["act"],
        "eps_spent": eps_spent,
        "delta_spent": b["delta_sgd"] + b["delta_act"],
        "noise_multiplier": info["noise_multiplier"],
        "sample_rate": info["sample_rate"],
        "steps": info["steps"],
        "act_sigma": ainfo["act_sigma"],
        "train_loss": info["train_loss"],
    }
    content = RecordDict(
        {
            "weights": weights,
            "acts": _acts_record(acts, counts),
            "metrics": MetricRecord(_finite(metrics)),
        }
    )
    return Message(content=content, reply_to=msg)


@app.train("align")
def align(msg: Message, context: Context) -> Message:
    """Step 2: match own neurons to the reference party's released package, release aligned."""
    pid, n = partition_of(context)
    cfg = parse_config(context.run_config, n)
    if "model" not in context.state:
        raise RuntimeError(f"party {pid}: train.align before train.local")
    own = record_layers(context.state["model"])
    ref = record_layers(msg.content["weights"])
    # only released (perturbed) statistics enter the matching, our own included: the permutation
    # is revealed through the aligned weights
    ref_acts, ref_counts = _acts(msg.content["acts"])
    own_acts, own_counts = _acts(context.state["acts"])
    keep = reliable_classes(ref_counts, own_counts, act_sigma(cfg, len(own) - 1))
    use_acts = bool(keep.any())
    perms = match(
        ref,
        own,
        [a[:, keep] for a in ref_acts] if use_acts else None,
        [a[:, keep] for a in own_acts] if use_acts else None,
        method=cfg["matcher"],
        act_weight=cfg["act-weight"],
    )
    aligned = permute_layers(own, perms)
    arrays = layers_record(aligned)
    moved = sum(int((p != np.arange(len(p))).sum()) for p in perms)
    content = RecordDict(
        {
            "weights": arrays,
            "metrics": MetricRecord(
                {"partition-id": pid, "moved_neurons": moved, "act_classes": int(keep.sum())}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.train("fuse")
def fuse(msg: Message, context: Context) -> Message:
    """Step 3 (fusing party): average the aligned models, train the filter adapter (DP-SGD)."""
    pid, n = partition_of(context)
    cfg = parse_config(context.run_config, n)
    torch.set_num_threads(1)
    models = [
        record_layers(rec)
        for name, rec in sorted(msg.content.array_records.items())
        if name.startswith("aligned.")
    ]
    if "model" in context.state:
        models.append(record_layers(context.state["model"]))
    fused_layers = average_layers(models)
    x, _, nc = party_data(cfg, pid, n)
    fused = set_layers(make_model(cfg, x.shape[1:], nc, 0), fused_layers)
    content = RecordDict({"fused": layers_record(fused_layers)})
    metrics = {"partition-id": pid, "fused_models": len(models), "eps_adapter": 0.0}
    if cfg["adapter-rank"] > 0:
        adapted, info = train_adapter(cfg, fused, pid, n)
        content["adapted"] = to_record(adapted)
        metrics |= {"eps_adapter": info["epsilon"], "adapter_steps": info["steps"]}
    content["metrics"] = MetricRecord(_finite(metrics))
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Plain ``train`` messages: the method's client step (the FedAvg baseline)."""
    pid, n = partition_of(context)
    cfg = parse_config(context.run_config, n)
    if cfg.method.client is None:
        raise ValueError(f"method={cfg['method']!r} has no client step for plain train messages")
    return cfg.method.client(msg, context, cfg)
