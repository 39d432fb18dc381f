"""FedDistr ClientApp.

``method = "feddistr"``: one ``train`` message, answered with this client's base distributions
(Gaussian condition parameters, labels, counts) fitted against the frozen shared generator.
``method = "fedavg" | "fedprox"``: local SGD on the global model (the baselines, on the same
partitions).
"""

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from feddistr.task import client_data, client_upload, make_model, parse_config
from flowerbed.common.client import add_partition_query, partition_of
from flowerbed.common.records import load_record, reply, to_record
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.train import get_device, train

app = ClientApp()
add_partition_query(app)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg = parse_config(context.run_config)
    pid, n = partition_of(context)
    if cfg["method"] == "feddistr":
        arrays, metrics = client_upload(cfg, pid, n)
        metrics["partition-id"] = pid
        record = to_record({k: torch.from_numpy(v) for k, v in arrays.items()})
        return Message(content=reply(record, **metrics), reply_to=msg)
    server_round = int(msg.content["config"]["server-round"])
    x, y = client_data(cfg, pid, n)
    model = load_record(make_model(cfg), msg.content["arrays"])
    gen = set_seed(derive_seed(cfg["seed"], pid, server_round))
    stats = train(
        model,
        x,
        y,
        epochs=cfg["local-epochs"],
        batch_size=cfg["batch-size"],
        lr=cfg["lr"],
        proximal_mu=cfg["proximal-mu"] if cfg["method"] == "fedprox" else 0.0,
        generator=gen,
        device=get_device(cfg["device"]),
    )
    content = reply(to_record(model), **stats, **{"num-examples": len(x)})
    return Message(content=content, reply_to=msg)
