"""FedQual ClientApp: the method's client step (quality estimate, calibrated local training, or a
baseline's step; :mod:`fedqual.methods`)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedqual.task import parse_config
from flowerbed.common.client import add_partition_query
from flowerbed.common.threads import fit_threads

app = ClientApp()
add_partition_query(app)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fit_threads(context)  # this node's share of the host's cores (flowerbed.common.threads)
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value
    return cfg.method.client(msg, context, cfg)
