"""FedDistr ClientApp: the method's client step (the method table's ``client``).

``feddistr``: one ``train`` message, answered with this client's base distributions (Gaussian
condition parameters, labels, counts) fitted against the frozen shared generator.
``fedavg`` / ``fedprox``: the shared local SGD step on the global model.
"""

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from feddistr.task import parse_config
from flowerbed.common.client import add_partition_query

app = ClientApp()
add_partition_query(app)


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg = parse_config(context.run_config)
    return cfg.method.client(msg, context, cfg)
