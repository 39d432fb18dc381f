"""fed-retrieval ClientApp: the users of this node train the dual encoder from the global model."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedretrieval.task import parse_config
from flowerbed.common.client import add_partition_query
from flowerbed.common.threads import fit_threads

app = ClientApp()
add_partition_query(app)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fit_threads(context)  # this node's share of the host's cores
    cfg = parse_config(context.run_config)  # a bad key or value: one line naming it
    return cfg.method.client(msg, context, cfg)
