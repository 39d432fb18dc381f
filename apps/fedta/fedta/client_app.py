"""FedTA ClientApp: one client's class-incremental task stream.

Kept in ``context.state`` across rounds (never in globals): the task stream (``stream``), the
private tail anchors, their keys, gate and head (``personal``, FedTA methods), the parameters of
the last local training (``local``: the client's own model, for KR_s) and its last local
prototypes (``local-protos``). The training step of each method is its row's ``client`` in
:data:`fedta.methods.METHODS` (:func:`fedta_step` or :func:`baseline_step`).
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedta import data as D
from fedta import task as T
from fedta.pretrain import load_backbone
from flowerbed.common.client import add_partition_query, partition_of
from flowerbed.common.seeding import derive_seed, set_seed

app = ClientApp()
add_partition_query(app)


def stream_of(context: Context, cfg, pid: int) -> list[list[int]]:
    """The client's task stream, created once and then read from ``context.state``."""
    if "stream" not in context.state.config_records:
        tasks = D.task_stream(
            cfg["seed"],
            pid,
            T.NUM_CLASSES,
            cfg["num-tasks"],
            cfg["classes-per-task"],
            cfg["task-order"],
        )
        context.state["stream"] = ConfigRecord(
            {"classes": [c for t in tasks for c in t], "per-task": cfg["classes-per-task"]}
        )
    rec = context.state["stream"]
    flat, k = list(rec["classes"]), int(rec["per-task"])
    return [flat[i : i + k] for i in range(0, len(flat), k)]


def client_data(cfg, pid: int, n: int) -> dict:
    """This client's ``{class: train indices}`` (the run config's ``partitioner``)."""
    return D.client_indices(
        cfg["data-dir"],
        cfg["pretrain-size"],
        cfg["surrogate-per-class"],
        n,
        cfg["partitioner"],
        cfg["seed"],
        alpha=cfg["alpha"],
        samples_per_class=cfg["samples-per-class"],
        min_samples=cfg["min-samples"],
    )[pid]


def personal_of(context: Context, cfg, dim: int, pid: int) -> dict[str, torch.Tensor]:
    if "personal" in context.state.array_records:
        return T.tensors_of(context.state["personal"])
    return T.initial_personal(cfg, dim, pid)


def _task_data(msg: Message, context: Context, cfg):
    """This round's task data, the frozen backbone and the (seed, partition, round) generator."""
    pid, n = partition_of(context)
    conf = msg.content["config"]
    classes = stream_of(context, cfg, pid)[int(conf["task"])]
    x, y = D.train_tensors(cfg["data-dir"], client_data(cfg, pid, n), classes)
    backbone = load_backbone(cfg)  # before the seed: building it (first use) reseeds torch
    gen = set_seed(derive_seed(cfg["seed"], pid, int(conf["server-round"])))
    return pid, classes, x, y, backbone, gen


def _reply(msg: Message, context: Context, res: T.LocalResult, classes, n: int) -> RecordDict:
    context.state["local"] = T.record_of(res.upload)
    return RecordDict(
        {
            "arrays": T.record_of(res.upload),
            "metrics": MetricRecord({**res.metrics, "num-examples": n}),
            "info": ConfigRecord({"classes": T.as_list(classes)}),
        }
    )


def fedta_step(msg: Message, context: Context, cfg) -> Message:
    """FedTA's local training (stages 1 and 2, prototypes); uploads pool and prototypes."""
    pid, classes, x, y, backbone, gen = _task_data(msg, context, cfg)
    res = T.train_fedta(
        cfg,
        backbone,
        T.tensors_of(msg.content["arrays"]),
        personal_of(context, cfg, backbone.dim, pid),
        T.protos_from_record(msg.content["protos"]),
        x,
        y,
        gen,
        use_ta=cfg.method.flag("ta"),
    )
    context.state["personal"] = T.record_of(res.personal)
    context.state["local-protos"] = T.record_of({f"p.{c}": v for c, v in res.protos.items()})
    content = _reply(msg, context, res, classes, len(x))
    content["protos"] = T.protos_to_record(res.protos, res.proto_keys)
    return Message(content=content, reply_to=msg)


def baseline_step(msg: Message, context: Context, cfg) -> Message:
    """A baseline's local training (l2p, fedvit, fedavg) on the current task."""
    _, classes, x, y, backbone, gen = _task_data(msg, context, cfg)
    res = T.train_baseline(cfg, backbone, T.tensors_of(msg.content["arrays"]), x, y, gen)
    return Message(content=_reply(msg, context, res, classes, len(x)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = T.parse_config(context.run_config)
    T.one_thread()  # bitwise reproducible runs (see fedta.task.one_thread)
    return cfg.method.client(msg, context, cfg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the global model (global shared parts + this client's private parts) on the
    client's seen classes, its first task and its current task; the local model on the current
    task (for KR_s)."""
    cfg = T.parse_config(context.run_config)
    T.one_thread()  # bitwise reproducible runs (see fedta.task.one_thread)
    pid, _ = partition_of(context)
    conf = msg.content["config"]
    task = int(conf["task"])
    seen = T.as_list(conf["seen-classes"])
    stream = stream_of(context, cfg, pid)
    backbone = load_backbone(cfg)
    shared = T.tensors_of(msg.content["arrays"])
    fedta = cfg.method.flag("prototypes")
    personal = personal_of(context, cfg, backbone.dim, pid) if fedta else {}
    protos = T.protos_from_record(msg.content["protos"]) if fedta else {}
    mine = sorted(c for t in stream[: task + 1] for c in t)
    tp = cfg["test-per-class"]

    def acc(shared_, protos_, classes):
        x, y = D.test_tensors(cfg["data-dir"], tp, classes)
        return T.accuracy(T.predict(cfg, backbone, shared_, personal, protos_, seen, x), y)

    metrics = {
        "acc": acc(shared, protos, mine),
        "acc_first": acc(shared, protos, stream[0]),
        "acc_cur_global": acc(shared, protos, stream[task]),
        "num-examples": len(mine) * tp,
        "pid": pid,
    }
    if "local" in context.state.array_records:
        local = T.tensors_of(context.state["local"])
        local_protos = dict(protos)
        if "local-protos" in context.state.array_records:
            local_protos.update(T.protos_from_record(context.state["local-protos"], "p."))
        metrics["acc_cur_local"] = acc(local, local_protos, stream[task])
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
