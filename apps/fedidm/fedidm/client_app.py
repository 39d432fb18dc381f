"""FedIDM ClientApp: the method's client step on this node's partition (label-flip attackers
train on flipped labels, :func:`flowerbed.common.attacks.poison_labels`)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedidm.task import parse_config
from flowerbed.common.client import add_partition_query
from flowerbed.common.threads import fit_threads

app = ClientApp()
add_partition_query(app)  # the attack wrapper asks each node its partition id


@app.train()
def train(msg: Message, context: Context) -> Message:
    fit_threads(context)
    cfg = parse_config(context.run_config)  # a bad key or value: one line naming it
    return cfg.method.client(msg, context, cfg)
