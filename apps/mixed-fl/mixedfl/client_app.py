"""Mixed FL ClientApp: the method's client step on this node's share of the clients' classes."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flowerbed.common.client import add_partition_query
from flowerbed.common.threads import fit_threads
from mixedfl.offload import client_ids
from mixedfl.task import parse_config

app = ClientApp()
add_partition_query(app)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fit_threads(context)  # this node's share of the host's cores (flowerbed.common.threads)
    cfg = parse_config(context.run_config)  # a bad key or value: one line naming it
    return cfg.method.client(msg, context, cfg)


@app.train("ids")
def ids(msg: Message, context: Context) -> Message:
    """Offloading, phase ``offload.ids``: the ids of the item rows this node uses."""
    cfg = parse_config(context.run_config)
    return client_ids(msg, context, cfg)
