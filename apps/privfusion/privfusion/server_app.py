"""PrivFusion ServerApp: a message RELAY for the decentralized protocol, plus the evaluation
harness of the experiments.

The server holds no model and makes no decision of the protocol: it forwards the reference
party's released package to the other parties (``train.align``) and the aligned models to the
fusing party (``train.fuse``); in a peer-to-peer deployment these would be direct transfers. It
also evaluates, on the global test split, what the experiment reports (each party's model, the
output ensemble, plain weight averaging, matched fusion, PrivFusion with the adapter), which no
party would do in deployment. ``method = "fedavg"`` runs the FedAvg-from-scratch baseline instead.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flowerbed.common.records import check_arrays, load_record, record_nbytes, to_record
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import output_dir, run_strategy
from flowerbed.common.train import evaluate
from flowerbed.strategies.fedavg import FedAvg
from privfusion.matching import average_layers
from privfusion.task import (
    AdaptedMLP,
    accuracy,
    arrays_to_layers,
    layers_to_arrays,
    make_model,
    parse_config,
    predict_proba,
    set_layers,
    test_data,
)

INFO, WARNING = 20, 30
APP = "privfusion"
app = ServerApp()


class Relay:
    """``grid.send_and_receive`` with byte counting (``record_nbytes``) per protocol step."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.sent = 0
        self.received = 0

    def exchange(self, kind: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        msgs = [
            Message(content=c, dst_node_id=node, message_type=f"train.{kind}")
            for node, c in contents.items()
        ]
        self.sent += sum(record_nbytes(c) for c in contents.values())
        out = {}
        for rep in self.grid.send_and_receive(msgs):
            node = rep.metadata.src_node_id
            if rep.has_error():
                log(WARNING, "[privfusion] %s: node %s failed: %s", kind, node, rep.error.reason)
                continue
            self.received += record_nbytes(rep.content)
            out[node] = rep
        return out


def _np(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)  # fails fast, naming the bad value, before any work
    writer = ResultsWriter(output_dir(cfg["results-dir"], APP), cfg, app=APP)
    x_test, y_test, bundle = test_data(cfg)
    nodes = _wait_for_nodes(grid)
    cfg = parse_config(context.run_config, len(nodes))  # fusing-party < parties, before any work
    if cfg["method"] == "fedavg":
        return _fedavg(cfg, grid, writer, x_test, y_test, bundle)
    template = make_model(cfg, bundle.input_shape, bundle.num_classes, 0)
    reference = ArrayRecord(
        {
            k: torch.from_numpy(v)
            for k, v in layers_to_arrays(
                [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in _linears(template)]
            ).items()
        }
    )
    relay = Relay(grid)
    t0 = time.perf_counter()

    # step 1: every party trains with DP-SGD and releases its perturbed package
    replies = relay.exchange(
        "local", {nd: RecordDict({"config": ConfigRecord({})}) for nd in nodes}
    )
    parties: dict[int, dict] = {}
    for node, rep in replies.items():
        m = rep.content["metrics"]
        pid = int(m["partition-id"])
        why = check_arrays(rep.content["weights"], reference)
        if why is None and not all(
            np.isfinite(a.numpy()).all() for a in rep.content["acts"].values()
        ):
            why = "activation statistics contain NaN/Inf"
        if why:
            log(WARNING, "[privfusion] party %d left out: %s", pid, why)
            continue
        parties[pid] = {
            "node": node,
            "weights": rep.content["weights"],
            "acts": rep.content["acts"],
            "metrics": dict(m),
        }
    fp = cfg["fusing-party"]
    if fp not in parties:
        raise RuntimeError(
            f"fusing-party={fp} did not return a valid model (parties: {sorted(parties)}); "
            f"it must be a partition id below the number of supernodes ({len(nodes)})"
        )
    pids = sorted(parties)
    models = []
    for pid in pids:
        mdl = make_model(cfg, bundle.input_shape, bundle.num_classes, 0)
        models.append(set_layers(mdl, arrays_to_layers(_np(parties[pid]["weights"]))))
    probs = [predict_proba(m, x_test) for m in models]
    party_acc = {pid: accuracy(p, y_test) for pid, p in zip(pids, probs, strict=True)}
    ens_acc = accuracy(sum(probs) / len(probs), y_test)
    avg = set_layers(
        make_model(cfg, bundle.input_shape, bundle.num_classes, 0),
        average_layers([arrays_to_layers(_np(parties[p]["weights"])) for p in pids]),
    )
    avg_acc = accuracy(predict_proba(avg, x_test), y_test)
    # a party without privacy reports -1 (records carry finite numbers): infinity
    eps = {pid: _eps(parties[pid]["metrics"]["eps_spent"]) for pid in pids}
    writer.add_round(
        1,
        step="local",
        bytes_sent=relay.sent,
        bytes_received=relay.received,
        parties=len(pids),
        **{f"party{p}_accuracy": a for p, a in party_acc.items()},
        ensemble_accuracy=ens_acc,
        averaging_accuracy=avg_acc,
    )
    log(
        INFO,
        "[privfusion] parties %s accuracy %s ensemble %.4f averaging %.4f",
        pids,
        [round(a, 4) for a in party_acc.values()],
        ens_acc,
        avg_acc,
    )

    # step 2: the reference package is relayed to every other party, which aligns itself
    ref = parties[fp]
    s0, r0 = relay.sent, relay.received
    aligned = relay.exchange(
        "align",
        {
            parties[p]["node"]: RecordDict({"weights": ref["weights"], "acts": ref["acts"]})
            for p in pids
            if p != fp
        },
    )
    aligned_ok = {}
    for rep in aligned.values():
        pid = int(rep.content["metrics"]["partition-id"])
        why = check_arrays(rep.content["weights"], reference)
        if why:
            log(WARNING, "[privfusion] aligned model of party %d left out: %s", pid, why)
            continue
        aligned_ok[pid] = rep.content["weights"]
    moved = sum(int(r.content["metrics"]["moved_neurons"]) for r in aligned.values())
    writer.add_round(
        2,
        step="align",
        bytes_sent=relay.sent - s0,
        bytes_received=relay.received - r0,
        moved_neurons=moved,
    )

    # step 3: the aligned models are relayed to the fusing party, which fuses and adapts
    s0, r0 = relay.sent, relay.received
    content = RecordDict({f"aligned.{p}": rec for p, rec in sorted(aligned_ok.items())})
    fused_rep = relay.exchange("fuse", {ref["node"]: content})
    if ref["node"] not in fused_rep:
        raise RuntimeError(f"fusing party {fp} failed in train.fuse")
    fc = fused_rep[ref["node"]].content
    fused = set_layers(
        make_model(cfg, bundle.input_shape, bundle.num_classes, 0),
        arrays_to_layers(_np(fc["fused"])),
    )
    matched_acc = accuracy(predict_proba(fused, x_test), y_test)
    eps_adapter = _eps(fc["metrics"]["eps_adapter"])
    if "adapted" in fc.array_records:
        adapted = load_record(AdaptedMLP(fused, cfg["adapter-rank"]), fc["adapted"])
        fusion_acc = accuracy(predict_proba(adapted, x_test), y_test)
    else:
        fusion_acc = matched_acc
    eps[fp] = eps[fp] + eps_adapter
    writer.add_round(
        3,
        step="fuse",
        bytes_sent=relay.sent - s0,
        bytes_received=relay.received - r0,
        matched_accuracy=matched_acc,
        privfusion_accuracy=fusion_acc,
    )
    final = {
        "privfusion_accuracy": fusion_acc,
        "matched_accuracy": matched_acc,
        "averaging_accuracy": avg_acc,
        "ensemble_accuracy": ens_acc,
        "party_best_accuracy": max(party_acc.values()),
        "party_mean_accuracy": float(np.mean(list(party_acc.values()))),
        **{f"party{p}_accuracy": a for p, a in party_acc.items()},
        **{f"party{p}_epsilon": e for p, e in eps.items()},
        "epsilon_max": max(eps.values()),
        "bytes_sent": relay.sent,
        "bytes_received": relay.received,
        "protocol_time_s": time.perf_counter() - t0,
    }
    writer.set("parties", {str(p): parties[p]["metrics"] for p in pids})
    writer.set("totals", {"bytes_sent": relay.sent, "bytes_received": relay.received})
    writer.set("final", final)
    path = writer.write(final=True)
    log(
        INFO,
        "[privfusion] eps=%s privfusion %.4f matched %.4f averaging %.4f ensemble %.4f "
        "best party %.4f -> %s",
        cfg["epsilon"] or "inf",
        fusion_acc,
        matched_acc,
        avg_acc,
        ens_acc,
        final["party_best_accuracy"],
        path,
    )


def _wait_for_nodes(grid: Grid, timeout: float = 300.0, settle: float = 5.0) -> list[int]:
    """The connected nodes, once at least one is up and the count was stable for ``settle`` s.

    The protocol is one-shot, so a party connecting late would be left out; on a loaded
    machine SuperNodes can take minutes to start.
    """
    deadline = time.monotonic() + timeout
    nodes: list[int] = []
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        now = sorted(grid.get_node_ids())
        if now != nodes:
            nodes, stable_since = now, time.monotonic()
        elif nodes and time.monotonic() - stable_since >= settle:
            return nodes
        time.sleep(0.5)
    if not nodes:
        raise RuntimeError(f"no SuperNode connected within {timeout:.0f} s")
    return nodes


def _eps(v) -> float:
    return math.inf if float(v) < 0 else float(v)


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _fedavg(cfg, grid, writer, x_test, y_test, bundle) -> None:
    """Non-private FedAvg trained from scratch (same MLP, same parties)."""
    model = make_model(cfg, bundle.input_shape, bundle.num_classes, 0)

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord(evaluate(load_record(model, arrays), x_test, y_test))

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
    )
    result = run_strategy(
        strategy,
        grid,
        to_record(model),
        cfg["fedavg-rounds"],
        writer,
        train_config=ConfigRecord({}),
        evaluate_fn=evaluate_fn,
    )
    final = result.evaluate_metrics_serverapp.get(cfg["fedavg-rounds"], {})
    totals = writer.record["extra"].get("totals", {})
    writer.set("final", {"fedavg_accuracy": float(final.get("accuracy", float("nan"))), **totals})
    path = writer.write(final=True)
    log(INFO, "[privfusion] fedavg accuracy %.4f -> %s", final.get("accuracy", float("nan")), path)
