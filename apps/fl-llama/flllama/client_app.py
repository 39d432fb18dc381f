"""FL-LLaMA ClientApp: blocks A and C of one client, one function per protocol phase.

``train.forward``  A's forward on the step's batch (+ noise); send hidden states + counts
``train.c``        C's forward, loss, backward, AdamW step on C; send dL/dh_B
``train.a``        backward through A with dL/dh_A, AdamW step on A
``train.sync``     send the A/C adapter for the FedAvg average
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flllama.task import client_a, client_c, client_forward, client_pool, parse_config
from flowerbed.common.client import add_partition_query, partition_of
from flowerbed.common.threads import fit_threads
from flowerbed.strategies.fl_llama import hidden_record, np_record

app = ClientApp()
add_partition_query(app)


def _setup(msg: Message, context: Context):
    fit_threads(context)
    cfg = parse_config(context.run_config)
    pid, n = partition_of(context)
    c = msg.content["config"]
    return cfg, pid, n, int(c["server-round"]), int(c.get("step", 0))


def _reply(msg, records: dict, **metrics) -> Message:
    content = RecordDict({**records, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.train("forward")
def forward(msg: Message, context: Context) -> Message:
    cfg, pid, n, rnd, step = _setup(msg, context)
    lora = msg.content["lora"] if "lora" in msg.content.array_records else None
    out = client_forward(cfg, context.state, pid, n, rnd, step, lora)
    rec = hidden_record(out["h"], out["counts"], cfg["mask-compression"])
    return _reply(msg, {"hidden": rec}, **{"num-examples": len(out["counts"])})


@app.train("c")
def backward_c(msg: Message, context: Context) -> Message:
    cfg, pid, n, rnd, step = _setup(msg, context)
    grad, loss = client_c(cfg, context.state, pid, n, rnd, step, msg.content["hidden"]["h"].numpy())
    return _reply(msg, {"grad": np_record({"g": grad})}, loss=loss)


@app.train("a")
def backward_a(msg: Message, context: Context) -> Message:
    cfg, pid, n, rnd, step = _setup(msg, context)
    client_a(cfg, context.state, pid, n, rnd, step, msg.content["grad"]["g"].numpy())
    return _reply(msg, {}, done=1)


@app.train("sync")
def sync(msg: Message, context: Context) -> Message:
    cfg, pid, n, _, _ = _setup(msg, context)
    if "lora" not in context.state:
        raise RuntimeError(f"client {pid}: train.sync before any step")
    return _reply(
        msg, {"lora": context.state["lora"]}, **{"num-examples": len(client_pool(pid, n))}
    )
