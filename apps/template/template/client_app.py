"""Template ClientApp: the method's client step on this node's partition."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flowerbed.common.client import add_partition_query, partition_of, split_label_counts
from flowerbed.common.participation import check_may_train, evaluate_splits
from flowerbed.common.records import reply
from flowerbed.common.threads import fit_threads
from template.task import local_evaluate, parse_config

app = ClientApp()
add_partition_query(app)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fit_threads(context)  # this node's share of the host's cores (flowerbed.common.threads)
    cfg = parse_config(context.run_config)  # a bad key or value: one line naming it
    check_may_train(cfg, *partition_of(context))  # unparticipating partitions never train
    return cfg.method.client(msg, context, cfg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The participation-gap evaluation (``unparticipating-fraction`` > 0): this client's
    splits (part-train / part-val, or all of an unparticipating client's data)."""
    fit_threads(context)
    cfg = parse_config(context.run_config)
    pid, n = partition_of(context)
    arrays = msg.content["arrays"]

    def score(part: str) -> dict:
        return local_evaluate(cfg, arrays, pid, n, part)

    metrics = evaluate_splits(cfg, pid, n, score, label_counts=split_label_counts(cfg, pid, n))
    return Message(content=reply(None, **metrics), reply_to=msg)
