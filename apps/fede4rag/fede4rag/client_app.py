"""FedE4RAG ClientApp: training (plain or CKKS), the HE setup, and the evaluator's call."""

import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fede4rag.task import evaluator, he_audit_error, parse_config, received_global
from flowerbed.common.client import add_partition_query
from flowerbed.common.threads import fit_threads

app = ClientApp()
add_partition_query(app)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fit_threads(context)
    cfg = parse_config(context.run_config)  # a bad key or value: one line naming it
    return cfg.method.client(msg, context, cfg)


@app.train("hesetup")
def he_setup(msg: Message, context: Context) -> Message:
    """Answer with the clients' CKKS context without its secret key."""
    from flowerbed.strategies.fede4rag import client_context, public_bytes

    cfg = parse_config(context.run_config)
    ctx = client_context(cfg["seed"], cfg["he-poly-degree"])
    conf = ConfigRecord({"public-context": public_bytes(ctx)})
    return Message(content=RecordDict({"he": conf}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The evaluator client: decrypt the global model and answer with its retrieval metrics."""
    fit_threads(context)
    cfg = parse_config(context.run_config)
    t0 = time.perf_counter()
    arrays, vec = received_global(msg, cfg)
    metrics = dict(evaluator(cfg)(arrays))
    if vec is not None and cfg["he-audit-dir"]:  # simulation diagnostic: CKKS vs plain mean
        metrics["he-max-abs-err"] = he_audit_error(cfg, msg.content["config"], vec)
    metrics["evaluate-time-s"] = time.perf_counter() - t0
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
