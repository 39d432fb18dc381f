"""FedGRPO ClientApp: a domain client.

``train.score``  score the completions it is sent (its own domain exactly), reply with one
                 scalar reward per completion and nothing else (FedGRPO and the graph's probe)
``train``        FedAvg-SFT: fine-tune the LoRA adapter on its own examples
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgrpo.task import parse_config, score, sft_step
from flowerbed.common.client import add_partition_query, partition_of
from flowerbed.common.threads import fit_threads
from flowerbed.strategies.fedgrpo import REWARD_LIST, REWARDS_KEY

app = ClientApp()
add_partition_query(app)


@app.train("score")
def score_completions(msg: Message, context: Context) -> Message:
    cfg = parse_config(context.run_config)
    pid, _ = partition_of(context)
    c = msg.content["config"]
    rewards = score(
        cfg,
        pid,
        int(c["server-round"]),
        list(c["questions"]),
        list(c["completions"]),
        int(c["group-size"]),
    )
    content = RecordDict({REWARDS_KEY: MetricRecord({REWARD_LIST: rewards})})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fit_threads(context)
    cfg = parse_config(context.run_config)
    pid, _ = partition_of(context)
    rnd = int(msg.content["config"].get("server-round", 0))
    arrays, metrics = sft_step(cfg, pid, rnd, msg.content["arrays"])
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
