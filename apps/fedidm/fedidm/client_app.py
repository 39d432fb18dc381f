"""FedIDM ClientApp: the method's client step on this node's partition (label-flip attackers
train on flipped labels, :func:`flowerbed.common.attacks.poison_labels`); with the
participation-gap option on, unparticipating partitions never train and every client answers
the gap evaluation on its splits."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedidm.task import make_model, parse_config
from flowerbed.common.client import add_partition_query, gap_evaluate, partition_of
from flowerbed.common.participation import check_may_train
from flowerbed.common.threads import fit_threads

app = ClientApp()
add_partition_query(app)  # the attack wrapper asks each node its partition id


@app.train()
def train(msg: Message, context: Context) -> Message:
    fit_threads(context)
    cfg = parse_config(context.run_config)  # a bad key or value: one line naming it
    check_may_train(cfg, *partition_of(context))  # unparticipating partitions never train
    return cfg.method.client(msg, context, cfg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The participation-gap evaluation (``unparticipating-fraction`` > 0)."""
    fit_threads(context)
    cfg = parse_config(context.run_config)
    return gap_evaluate(msg, context, cfg, lambda: make_model(cfg))
