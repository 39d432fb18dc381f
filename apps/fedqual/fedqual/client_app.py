"""FedQual ClientApp: quality estimate, calibrated local training (or a baseline's step)."""

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedqual.task import local_train, parse_config
from flowerbed.common.client import add_partition_query, partition_of
from flowerbed.common.records import config_get, reply

app = ClientApp()
add_partition_query(app)

LOCAL_MODEL = "local-model"


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value
    pid, n = partition_of(context)
    conf = msg.content["config"]
    server_round = int(conf["server-round"])
    arrays = msg.content["arrays"]
    if cfg["method"] == "local" and LOCAL_MODEL in context.state.array_records:
        arrays = context.state[LOCAL_MODEL]  # local-only: continue from this client's own model
    arrays, metrics = local_train(
        cfg,
        arrays,
        pid,
        n,
        server_round,
        q_ref=config_get(conf, "q-ref", 0.0),
        alpha_max=config_get(conf, "alpha-max", cfg["alpha-max"]),
    )
    if cfg["method"] == "local":
        context.state[LOCAL_MODEL] = ArrayRecord(arrays.to_torch_state_dict())
    return Message(content=reply(arrays, **metrics), reply_to=msg)
