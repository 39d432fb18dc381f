"""FedBone ClientApp: one function per phase of the split protocol, plus the whole-model step of
the FedAvg / local-only baselines.

``train.embed``      patch embeddings of the step's batch
``train.head``       adaptation + head + loss on the features, Adam step; reply dL/dF
``train.back``       backward through the patch embedding with dL/de, Adam step
``train.evalembed``  patch embeddings of the held-out images
``train.evalhead``   the task metric on the features of the held-out images
``train`` / ``evaluate``  whole model (FedAvg, local-only)
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbone import task as T
from flowerbed.common.client import LOCAL_MODEL, add_partition_query, partition_of
from flowerbed.common.threads import fit_threads
from flowerbed.strategies.fedbone import COMPUTE_KEY, tensor_record

app = ClientApp()
add_partition_query(app)


def _setup(msg: Message, context: Context):
    fit_threads(context)
    cfg = T.parse_config(context.run_config)  # a bad key or value: one line naming it
    pid, n = partition_of(context)
    c = msg.content["config"] if "config" in msg.content.config_records else {}
    return cfg, pid, n, int(c.get("server-round", 0)), int(c.get("step", 0))


def _reply(msg: Message, pid: int, records: dict, **metrics) -> Message:
    content = RecordDict(
        {
            **records,
            "metrics": MetricRecord(metrics),
            "config": ConfigRecord({"task": T.task_of(pid)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.train("embed")
def embed(msg: Message, context: Context) -> Message:
    cfg, pid, n, rnd, step = _setup(msg, context)
    e, secs = T.client_embed(cfg, context.state, pid, n, rnd, step)
    return _reply(msg, pid, {"embed": tensor_record(t=e)}, **{COMPUTE_KEY: secs})


@app.train("head")
def head(msg: Message, context: Context) -> Message:
    cfg, pid, n, rnd, step = _setup(msg, context)
    feats = msg.content["features"]["t"].numpy()
    grad, loss, secs = T.client_head(cfg, context.state, pid, n, rnd, step, feats)
    return _reply(msg, pid, {"grad": tensor_record(t=grad)}, loss=loss, **{COMPUTE_KEY: secs})


@app.train("back")
def back(msg: Message, context: Context) -> Message:
    cfg, pid, n, rnd, step = _setup(msg, context)
    secs = T.client_back(cfg, context.state, pid, n, rnd, step, msg.content["grad"]["t"].numpy())
    return _reply(msg, pid, {}, **{COMPUTE_KEY: secs})


@app.train("evalembed")
def eval_embed(msg: Message, context: Context) -> Message:
    cfg, pid, n, _, _ = _setup(msg, context)
    e = T.client_eval_embed(cfg, context.state, pid, n)
    return _reply(msg, pid, {"embed": tensor_record(t=e)}, **{"num-examples": len(e)})


@app.train("evalhead")
def eval_head(msg: Message, context: Context) -> Message:
    cfg, pid, n, _, _ = _setup(msg, context)
    feats = msg.content["features"]["t"].numpy()
    metrics = T.client_eval_head(cfg, context.state, pid, n, feats)
    return _reply(msg, pid, {}, **metrics, **{"num-examples": len(feats)})


def _general(msg: Message, context: Context, local: bool) -> ArrayRecord:
    if local and LOCAL_MODEL in context.state.array_records:
        return context.state[LOCAL_MODEL]
    return msg.content["arrays"]


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, pid, n, rnd, _ = _setup(msg, context)
    local = bool(cfg.method.flag("local", False))
    arrays, metrics = T.whole_train(cfg, context.state, pid, n, rnd, _general(msg, context, local))
    if local:
        context.state[LOCAL_MODEL] = arrays
    return Message(
        content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, pid, n, _, _ = _setup(msg, context)
    general = _general(msg, context, bool(cfg.method.flag("local", False)))
    metrics = T.whole_evaluate(cfg, context.state, pid, n, general)
    metrics["num-examples"] = cfg["eval-samples"]
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
