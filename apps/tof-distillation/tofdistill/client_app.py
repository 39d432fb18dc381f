"""TOF distillation ClientApp: a data owner.

``train.flowchart``  select dialogues (set cover), build the flowchart from them and send it with
                     the selection's statistics; the dialogues never leave
``train``            distil: synthetic dialogues from the received merged flowchart (or its own),
                     fine-tune the student's LoRA adapter, send the adapter
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerbed.common.client import add_partition_query, keep_local, partition_of, start_arrays
from flowerbed.common.threads import fit_threads
from flowerbed.strategies.tof_distillation import FLOWCHART_KEY, read_flowchart
from tofdistill.task import client_fit, client_flowchart, parse_config

app = ClientApp()
add_partition_query(app)


@app.train("flowchart")
def flowchart(msg: Message, context: Context) -> Message:
    cfg = parse_config(context.run_config)
    pid, _ = partition_of(context)
    chart, stats = client_flowchart(cfg, pid)
    content = RecordDict({FLOWCHART_KEY: chart.record(), "metrics": MetricRecord(stats)})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fit_threads(context)
    cfg = parse_config(context.run_config)
    pid, _ = partition_of(context)
    rnd = int(msg.content["config"].get("server-round", 0))
    chart = None
    if FLOWCHART_KEY in msg.content.config_records:
        chart = read_flowchart(msg.content)
    arrays, metrics = client_fit(cfg, pid, rnd, start_arrays(msg, context), chart)
    keep_local(msg, context, arrays)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
