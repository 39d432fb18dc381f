"""Match-and-merge ClientApp: train the local LM on this client's domain text and upload it."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flowerbed.common.client import add_partition_query
from flowerbed.common.threads import fit_threads
from matchmerge.task import parse_config

app = ClientApp()
add_partition_query(app)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fit_threads(context)
    cfg = parse_config(context.run_config)  # a bad key or value: one line naming it
    return Message(content=cfg.method.client(msg, context, cfg), reply_to=msg)
