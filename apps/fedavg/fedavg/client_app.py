"""FedAvg ClientApp: the method's client step on this node's partition, evaluation on it."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedavg.secagg import is_legacy, legacy_train, secagg_switch
from fedavg.task import local_evaluate, parse_config
from flowerbed.common.client import add_partition_query, partition_of, split_label_counts
from flowerbed.common.faults import maybe_inject
from flowerbed.common.participation import check_may_train, evaluate_splits, is_gap_evaluation
from flowerbed.common.records import reply
from flowerbed.common.threads import fit_threads

app = ClientApp()
add_partition_query(app)


@app.train(mods=[secagg_switch])  # SecAgg+ stages go to Flower's secaggplus_mod (secagg = true)
def train(msg: Message, context: Context) -> Message:
    threads = fit_threads(context)  # this node's share of the host's cores (common.threads)
    cfg = parse_config(context.run_config)
    pid, n = partition_of(context)
    if is_legacy(msg):  # the SecAgg+ workflow sends a legacy FitIns
        return legacy_train(cfg, msg, pid, n)
    maybe_inject(cfg, pid, int(msg.content["config"]["server-round"]))  # fault-* keys; off
    check_may_train(cfg, pid, n)  # an unparticipating partition never trains
    out = cfg.method.client(msg, context, cfg)
    out.content["metrics"]["torch-threads"] = threads
    return out


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    fit_threads(context)
    cfg = parse_config(context.run_config)
    pid, n = partition_of(context)
    arrays = msg.content["arrays"]
    if is_gap_evaluation(msg):  # participation gap: part-train / part-val or unpart
        metrics = evaluate_splits(
            cfg,
            pid,
            n,
            lambda part: local_evaluate(cfg, arrays, pid, n, part, per_class=True),
            label_counts=split_label_counts(cfg, pid, n),  # per-client rows in results.json
        )
    else:
        metrics = local_evaluate(cfg, arrays, pid, n)
    return Message(content=reply(None, **metrics), reply_to=msg)
