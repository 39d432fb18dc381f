"""FedAvg with secure aggregation: Flower's SecAgg+ behind the app's ``secagg`` option.

SecAgg+ exists in Flower 1.42 only in the legacy API: the server side is
``flwr.server.workflow.SecAggPlusWorkflow`` run inside ``DefaultWorkflow`` with a legacy
``flwr.server.strategy.FedAvg`` and a ``LegacyContext``; the client side is the mod
``flwr.client.mod.secaggplus_mod``, which speaks the legacy ``FitIns``/``FitRes`` records. This
module wraps both so that the app's Message-API ClientApp and ServerApp stay the entry points:

- ServerApp: :func:`run_secagg` replaces the Message-API strategy when ``secagg = true`` and
  writes the same ``results.json`` rows (server accuracy per round, bytes sent/received counted
  on the messages, number of replies and failures, final metrics).
- ClientApp: :func:`secagg_switch` (a mod on ``@app.train``) hands messages that carry SecAgg+
  stage configs to ``secaggplus_mod``; :func:`legacy_train` runs the app's own ``local_train``
  on a legacy ``FitIns`` and answers with a legacy ``FitRes`` (which the mod masks).

What the server receives from a client is, per stage: two public keys, encrypted key shares
for other clients, the **masked** quantized update (the mod clears the plain arrays before the
reply leaves the client), and key shares of its neighbours. Only the sum of the masked vectors
is unmasked. Consequently the server cannot check individual updates (shape/NaN/norm checks of
:meth:`flowerbed.strategies.fedavg.FedAvg.check_reply` do not apply); each coordinate is clipped
to ``[-secagg-clipping-range, secagg-clipping-range]`` by the quantizer.

Aggregation error (the bound the tests use). A client with ``n_i`` examples sends
``q_i = SR((w_i p_i + c) Q / 2c)`` with ``w_i = round(n_i Q / W) / Q`` (``W`` = max weight,
``Q`` = quantization range, ``c`` = clipping range, ``SR`` stochastic rounding, error < 1).
The server gets ``sum_i w_i p_i / sum_i w_i`` up to ``k * 1.5 * (2c / Q) / sum_i w_i`` per
coordinate (``k`` clients; < 1 step of stochastic rounding plus < 0.25 step of float32 rounding,
since the mod quantizes float32 arrays), if ``|w_i p_i| <= c``; the weights ``w_i`` differ from
``n_i / W`` by at most ``1 / (2Q)``. With the defaults (c = 8, Q = 2**22, W = the largest
partition) and k = 3 equal clients that is about 6e-6 per coordinate. The modulus ``2**32`` must exceed ``k * Q``: ``k < 1024`` clients per round at the
default ``Q = 2**22``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from flowerbed.common.protocol import Protocol, ProtocolGrid

# Test hook: a callable(stage, payload) that sees what the ServerApp sends/receives.
TAP: Callable[[str, Any], None] | None = None

SECAGG_CONFIGS = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants


# --------------------------------------------------------------------------- client side
def secagg_switch(msg: Message, ctxt: Context, call_next) -> Message:
    """Mod: SecAgg+ messages go through Flower's ``secaggplus_mod``, the rest unchanged."""
    if SECAGG_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def is_legacy(msg: Message) -> bool:
    """Whether ``msg`` carries a legacy ``FitIns`` (sent by the SecAgg+ workflow)."""
    return "fitins.parameters" in msg.content.array_records


def legacy_train(cfg: dict, msg: Message, pid: int, n: int) -> Message:
    """Run the app's ``local_train`` on a legacy ``FitIns``; reply with a legacy ``FitRes``."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fedavg.task import initial_arrays, local_train

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    server_round = int(fitins.config["server-round"])
    from flowerbed.common.faults import maybe_inject

    maybe_inject(cfg, pid, server_round)
    reference = initial_arrays(cfg)  # names, shapes and dtypes of the model's arrays
    arrays = to_named(parameters_to_ndarrays(fitins.parameters), reference)
    out, metrics = local_train(cfg, arrays, pid, n, server_round)
    res = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([a.numpy() for a in out.values()]),
        num_examples=int(metrics["num-examples"]),
        metrics={k: float(v) for k, v in metrics.items() if k != "num-examples"},
    )
    return Message(content=compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def to_named(ndarrays: list[np.ndarray], reference: ArrayRecord) -> ArrayRecord:
    """Positional arrays -> an ArrayRecord with ``reference``'s keys, shapes and dtypes."""
    if len(ndarrays) != len(reference):
        raise ValueError(f"got {len(ndarrays)} arrays, the model has {len(reference)}")
    out = {}
    for (k, ref), a in zip(reference.items(), ndarrays, strict=True):
        r = ref.numpy()
        out[k] = Array(np.asarray(a, dtype=r.dtype).reshape(r.shape))
    return ArrayRecord(out)


# --------------------------------------------------------------------------- server side
class CountingGrid(ProtocolGrid):
    """The protocol layer's grid (bytes per round and phase, with the one byte definition of
    :func:`flowerbed.common.records.wire_nbytes`) for the legacy workflow, whose round is the
    messages' group id; it also keeps which nodes were sent a message and which failed."""

    def __init__(self, grid) -> None:
        super().__init__(grid, Protocol(grid))
        self.sampled: dict[int, set[int]] = {}  # round -> nodes sent a message
        self.failed: dict[int, set[int]] = {}  # round -> nodes with an error or no reply

    @property
    def rows(self) -> dict[int, dict]:
        return self.protocol.rounds

    def send_and_receive(self, messages, *, timeout=None):
        messages = _own_contents(list(messages))
        if not messages:
            return []
        self.protocol.current_round = int(messages[0].metadata.group_id or 0)
        replies = self.protocol.send_and_receive(messages, timeout=timeout)
        ok: dict[int, set[int]] = {}
        for r in replies:
            if r.has_content():
                ok.setdefault(int(r.metadata.group_id or 0), set()).add(r.metadata.src_node_id)
        for m in messages:
            rnd, nid = int(m.metadata.group_id or 0), m.metadata.dst_node_id
            self.sampled.setdefault(rnd, set()).add(nid)
            if nid not in ok.get(rnd, set()):
                self.failed.setdefault(rnd, set()).add(nid)
        if TAP is not None:
            TAP("exchange", (messages, replies))
        return replies


def _own_contents(messages: list[Message]) -> list[Message]:
    """Give every message its own content: the SecAgg+ workflow sends one RecordDict to all
    nodes and ``secaggplus_mod`` pops keys from it, which is harmless when the grid serializes
    messages (Flower's grids) but not with an in-process grid that passes objects through."""
    import copy

    seen: set[int] = set()
    out = []
    for m in messages:
        if id(m.content) in seen:
            m = Message(
                content=copy.deepcopy(m.content),
                dst_node_id=m.metadata.dst_node_id,
                message_type=m.metadata.message_type,
                group_id=m.metadata.group_id,
            )
        seen.add(id(m.content))
        out.append(m)
    return out


def secagg_workflow(cfg: dict, max_weight: float):
    """Flower's ``SecAggPlusWorkflow`` with the app's ``secagg-*`` options."""
    from flwr.server.workflow import SecAggPlusWorkflow

    shares = cfg["secagg-num-shares"]
    threshold = cfg["secagg-reconstruction-threshold"]
    return SecAggPlusWorkflow(
        num_shares=int(shares) if shares > 1 else float(shares),
        reconstruction_threshold=int(threshold) if threshold > 1 else float(threshold),
        max_weight=float(max_weight),
        clipping_range=cfg["secagg-clipping-range"],
        quantization_range=int(cfg["secagg-quantization-range"]),
        timeout=cfg["round-timeout"],
    )


def run_secagg(grid, context: Context, cfg: dict, writer, evaluate, init: ArrayRecord, nodes):
    """Run ``num-server-rounds`` of FedAvg with SecAgg+; write rows into ``writer``.

    ``evaluate(round, ArrayRecord) -> dict`` is the server-side evaluation, ``init`` the initial
    global model, ``nodes`` the number of nodes. Returns the final metrics.
    """
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow

    from fedavg.task import label_histograms

    names = list(init.keys())
    max_weight = cfg["secagg-max-weight"] or max(sum(h) for h in label_histograms(cfg, nodes))
    counting = CountingGrid(grid)
    last: dict[str, Any] = {"t": time.perf_counter(), "metrics": {}}
    fit_rows: dict[int, dict[str, Any]] = {}

    def evaluate_fn(server_round: int, ndarrays, config):
        arrays = to_named(ndarrays, init)
        metrics = evaluate(server_round, arrays)
        now = time.perf_counter()
        row = {"round_time_s": round(now - last["t"], 4), **fit_rows.get(server_round, {})}
        row.update(counting.rows.get(server_round, {}))
        row.update({f"server_{k}": v for k, v in metrics.items()})
        last.update(t=now, metrics=metrics)
        writer.add_round(server_round, **row)
        if TAP is not None:
            TAP("global", (server_round, arrays))
        return float(metrics.get("loss", 0.0)), metrics

    class SecAggFedAvg(LegacyFedAvg):
        """Legacy FedAvg whose aggregate keeps the model's dtypes and logs the round's row."""

        def aggregate_fit(self, server_round, results, failures):
            # Flower's workflow lists a failed reply twice in `failures`: count nodes instead
            fit_rows[server_round] = {
                "num_sampled": len(counting.sampled.get(server_round, ())),
                "num_train_replies": len(results),
                "num_failures": len(counting.failed.get(server_round, ())),
                "secagg_max_weight": float(max_weight),
            }
            params, metrics = super().aggregate_fit(server_round, results, failures)
            if params is None:
                return None, metrics
            arrays = to_named(parameters_to_ndarrays(params), init)
            return ndarrays_to_parameters([arrays[k].numpy() for k in names]), metrics

    strategy = SecAggFedAvg(
        fraction_fit=cfg["fraction-train"],
        fraction_evaluate=0.0,
        min_fit_clients=2,
        min_evaluate_clients=0,
        min_available_clients=nodes,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda rnd: {"server-round": rnd},
        initial_parameters=ndarrays_to_parameters([init[k].numpy() for k in names]),
        fit_metrics_aggregation_fn=_weighted_metrics,
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=cfg["num-server-rounds"]), strategy=strategy
    )
    DefaultWorkflow(fit_workflow=secagg_workflow(cfg, max_weight))(counting, legacy)
    for rnd, row in counting.rows.items():
        if rnd > 0:
            writer.add_round(rnd, **row, **fit_rows.get(rnd, {}))
    writer.set("totals", counting.protocol.totals())
    return dict(last["metrics"])


def _weighted_metrics(pairs: list[tuple[int, dict]]) -> dict[str, float]:
    total = sum(n for n, _ in pairs) or 1
    keys = set().union(*(m.keys() for _, m in pairs)) if pairs else set()
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in pairs) / total for k in sorted(keys)}
