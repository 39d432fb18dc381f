"""Mixed FL, offloading use case: an item table's spreadout regulariser computed at the server.

Augenstein, Hard, Ning, Singhal, Kale, Partridge and Mathews, "Mixed Federated Learning: Joint
Decentralized and Centralized Learning", arXiv:2205.13655 (2022). From the paper: a term of the
loss that needs no client data (there: an embedding regulariser) can be moved to the server as the
centralized loss ``f_c``, "cutting client communication and computation by more than 90%".

The model is an item embedding table ``T`` (``V + 1`` rows, row 0 = padding). ``f_f`` is the
clients' loss on their own interactions, which touches only the rows of their own items; ``f_c``
is ``lam * spreadout_sq(T[1:])`` (:func:`flowerbed.common.embedding.spreadout_sq`: the sum of the
squared off-diagonal cosine similarities of the rows), which touches every row. Two modes
(RECONSTRUCTION of the paper's setup, whose algorithm box was not available):

``offload`` (PARALLEL TRAINING with sparse rows)
    phase ``offload.ids`` (message type ``train.ids``): each sampled client uploads the ids of
    the rows it uses (int32); phase ``train``: it receives only those rows (``rows``:
    ``{"ids", "rows"}``), takes its local steps on ``f_i`` and returns its rows (``rows``:
    ``{"rows"}``, the shape it received). The server averages the row deltas as FedAvg over the
    full table would (:func:`scatter_mean_rows`: a row a client did not receive counts as an
    unchanged row of that client) and, from ``x^t``, takes ``K_c`` SGD steps on ``f_c``
    (:func:`spreadout_steps`); ``Delta = w_f Delta_f + w_c Delta_c``,
    ``x^{t+1} = x^t + eta_s Delta`` (:func:`flowerbed.strategies.mixed_fl.parallel_delta`,
    :func:`~flowerbed.strategies.mixed_fl.apply_delta`).
``baseline`` (no offloading)
    FedAvg on the whole objective: every sampled client downloads the whole table, steps on
    ``w_f f_i + w_c f_c`` and returns the whole table (the regulariser's gradient touches every
    row); ``x^{t+1} = x^t + eta_s mean_i Delta_i`` (Flower's ``aggregate_arrayrecords``).

Every reply is validated (ids: 1-D int32, strictly increasing, in ``1..V``, not empty; rows: the
shape and dtype sent, finite; a finite positive ``num-examples``): a bad one is left out with its
reason in ``results.json`` and never reaches the table. Clients are sampled by partition id from
(seed, round). Bytes per phase and direction are the protocol layer's count;
:attr:`OffloadedSpreadout.history` adds the server's compute (FLOPs of its ``f_c`` steps) and
``f_c`` before and after the round.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flowerbed.common.embedding import spreadout_flops, spreadout_sq
from flowerbed.common.protocol import PhasedStrategy, Protocol, RoundOutcome, wait_for_nodes
from flowerbed.common.seeding import sample_partitions
from flowerbed.strategies.fedavg import query_partitions
from flowerbed.strategies.mixed_fl import apply_delta, parallel_delta

MODES = ("offload", "baseline")
IDS_PHASE, IDS_TYPE = "offload.ids", "train.ids"
TRAIN_PHASE = "train"
ROWS, IDS, TABLE = "rows", "ids", "table"  # record / array names
MODE_KEY = "offload-mode"
WF_KEY, WC_KEY, LAMBDA_KEY = "w-f", "w-c", "spreadout-lambda"
WEIGHT = "num-examples"
#: client metrics averaged into the round's train metrics (per sampled client)
CLIENT_METRICS = ("client-flops", "client-rows", "client-steps", "train-loss", "train-time-s")


class OffloadError(ValueError):
    """An offloading setting that cannot run (unknown mode, negative weight or lambda)."""


# ---------------------------------------------------------------------------- pure pieces
def fc_value(table: np.ndarray, lam: float) -> float:
    """``f_c = lam * spreadout_sq(T[1:])`` (row 0, the padding, left out)."""
    t = torch.from_numpy(np.asarray(table[1:], dtype=np.float64))
    return float(lam * spreadout_sq(t))


def spreadout_steps(table: np.ndarray, lam: float, steps: int, lr: float) -> np.ndarray:
    """``steps`` SGD steps ``z <- z - lr grad f_c(z)`` from ``table``; row 0 never moves."""
    z = torch.tensor(np.asarray(table), dtype=torch.float32)
    rows = z[1:].clone().requires_grad_(True)
    for _ in range(steps):
        rows.grad = None
        (lam * spreadout_sq(rows)).backward()
        with torch.no_grad():
            rows -= lr * rows.grad
    z[1:] = rows.detach()
    return z.numpy()


def scatter_mean_rows(
    shape: tuple[int, int], parts: list[tuple[np.ndarray, np.ndarray, float]]
) -> np.ndarray:
    """``Delta_f = sum_i w_i Delta_i / sum_i w_i`` on the full table from sparse row deltas.

    ``parts`` holds ``(ids, delta_rows, w_i)`` per client; a row a client did not receive adds
    0 for it but its weight still counts: the same mean as FedAvg over full tables.
    """
    out = np.zeros(shape, dtype=np.float64)
    total = 0.0
    for ids, delta, w in parts:
        np.add.at(out, ids, float(w) * np.asarray(delta, dtype=np.float64))
        total += float(w)
    if total <= 0:
        raise OffloadError("no positive weight to average")
    return out / total


def check_ids(msg: Message, num_items: int) -> str | None:
    """Why an ``offload.ids`` reply must be left out, or None."""
    why = _check_weight(msg)
    if why is not None:
        return why
    if IDS not in msg.content.array_records or IDS not in msg.content[IDS]:
        return f"no ArrayRecord {IDS!r} with an array {IDS!r}"
    ids = msg.content[IDS][IDS].numpy()
    if ids.dtype != np.int32 or ids.ndim != 1 or len(ids) == 0:
        return f"ids must be a non-empty 1-D int32 array, got {ids.dtype} {ids.shape}"
    if ids[0] < 1 or ids[-1] > num_items or (len(ids) > 1 and np.any(np.diff(ids) <= 0)):
        return f"ids must be strictly increasing in 1..{num_items}"
    return None


def check_rows(msg: Message, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why a ``train`` reply must be left out (its ``rows`` not the shape and dtype sent, or not
    finite), or None."""
    why = _check_weight(msg)
    if why is not None:
        return why
    if ROWS not in msg.content.array_records or ROWS not in msg.content[ROWS]:
        return f"no ArrayRecord {ROWS!r} with an array {ROWS!r}"
    rows = msg.content[ROWS][ROWS].numpy()
    if rows.shape != tuple(shape) or rows.dtype != dtype:
        return f"rows {rows.dtype} {rows.shape}, expected {np.dtype(dtype)} {tuple(shape)}"
    if not np.isfinite(rows).all():
        return "rows contain NaN or Inf"
    return None


def _check_weight(msg: Message) -> str | None:
    metrics = msg.content.metric_records.get("metrics")
    w = None if metrics is None else metrics.get(WEIGHT)
    if not isinstance(w, int | float) or not np.isfinite(w) or w <= 0:
        return f"weight {WEIGHT!r}={w!r} is not a finite positive number"
    return None


# ---------------------------------------------------------------------------- the strategy
class OffloadedSpreadout(PhasedStrategy):
    """Spreadout-regularised item table, the regulariser offloaded to the server or not.

    Parameters
    ----------
    mode : {"offload", "baseline"}
        ``offload``: sparse rows, ``f_c`` at the server; ``baseline``: full table, ``f_c`` on
        every client.
    w_f, w_c : float
        Weights of the clients' loss and of ``f_c`` (>= 0, not both 0).
    spreadout_lambda : float
        ``lam`` of ``f_c = lam * spreadout_sq(T[1:])`` (>= 0).
    server_steps : int
        ``K_c``: SGD steps on ``f_c`` per round at the server (offload).
    lr : float
        Learning rate of those steps (the clients' own is in the app).
    server_lr : float, default 1.0
        ``eta_s`` of ``x^{t+1} = x^t + eta_s Delta``.
    fraction_train : float, default 1.0
        Share of the connected nodes sampled per round (at least ``min_nodes``).
    min_nodes : int, default 1
        Nodes to wait for; rounds with no valid reply keep the table.
    sample_seed : int, default 0
        Seed of the per-round sample (by partition id, :func:`sample_partitions`).
    """

    def __init__(
        self,
        mode: str,
        w_f: float,
        w_c: float,
        spreadout_lambda: float,
        server_steps: int,
        lr: float,
        server_lr: float = 1.0,
        fraction_train: float = 1.0,
        min_nodes: int = 1,
        sample_seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise OffloadError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
        if w_f < 0 or w_c < 0 or w_f + w_c == 0 or spreadout_lambda < 0:
            raise OffloadError(
                f"w_f={w_f!r}, w_c={w_c!r}, spreadout_lambda={spreadout_lambda!r}: "
                "weights >= 0 and not both 0, lambda >= 0"
            )
        if server_lr <= 0 or lr <= 0 or server_steps < 0 or not 0 < fraction_train <= 1:
            raise OffloadError(
                f"server_lr={server_lr!r}, lr={lr!r} must be > 0, server_steps={server_steps!r}"
                f" >= 0, fraction_train={fraction_train!r} in (0, 1]"
            )
        self.mode = mode
        self.w_f, self.w_c = float(w_f), float(w_c)
        self.lam = float(spreadout_lambda)
        self.server_steps, self.lr, self.server_lr = int(server_steps), float(lr), float(server_lr)
        self.fraction_train, self.min_nodes = float(fraction_train), int(min_nodes)
        self.sample_seed = int(sample_seed)
        self.history: dict[int, dict[str, Any]] = {}
        self._pids: dict[int, int] = {}

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t└──> Mixed FL offloading (spreadout f_c): mode %s", self.mode)
        log(INFO, "\t\t├── w_f = %g, w_c = %g, lambda = %g", self.w_f, self.w_c, self.lam)
        log(INFO, "\t\t├── server steps K_c = %d, lr = %g", self.server_steps, self.lr)
        log(
            INFO, "\t\t└── server_lr = %g, fraction_train = %g", self.server_lr, self.fraction_train
        )

    def _sample(self, protocol: Protocol, server_round: int) -> list[int]:
        nodes = wait_for_nodes(protocol.grid, self.min_nodes)
        if set(nodes) - set(self._pids):
            self._pids, _ = query_partitions(protocol.grid, nodes)
        by_pid = {p: n for n, p in self._pids.items() if n in nodes}
        present = sorted(by_pid)
        k = min(max(int(len(present) * self.fraction_train), self.min_nodes, 1), len(present))
        pos = sample_partitions(self.sample_seed, server_round, len(present), k)
        return [by_pid[present[i]] for i in pos]

    def _config(self, train_config: ConfigRecord, server_round: int) -> ConfigRecord:
        conf = ConfigRecord(dict(train_config))
        conf["server-round"] = server_round
        conf[MODE_KEY] = self.mode
        conf[WF_KEY], conf[WC_KEY], conf[LAMBDA_KEY] = self.w_f, self.w_c, self.lam
        return conf

    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """The phases of one round (``offload.ids`` + ``train``, or ``train`` alone)."""
        table = arrays[TABLE].numpy()
        nodes = self._sample(protocol, server_round)
        conf = self._config(train_config, server_round)
        row: dict[str, Any] = {"mode": self.mode, "num_sampled": len(nodes)}
        self.history[server_round] = row
        row["f_c_before"] = fc_value(table, self.lam)
        if self.mode == "offload":
            asked = protocol.broadcast(
                IDS_PHASE,
                RecordDict({"config": conf}),
                nodes,
                message_type=IDS_TYPE,
                validate=lambda m: check_ids(m, len(table) - 1),
            )
            ids = {m.metadata.src_node_id: m.content[IDS][IDS].numpy() for m in asked.replies}
            contents = {
                n: RecordDict(
                    {
                        ROWS: ArrayRecord({IDS: Array(i), ROWS: Array(table[i])}),
                        "config": conf,
                    }
                )
                for n, i in ids.items()
            }
            shapes = {n: (len(i), table.shape[1]) for n, i in ids.items()}
        else:
            content = RecordDict({"arrays": arrays, "config": conf})
            contents = {n: content for n in nodes}
            shapes = {n: table.shape for n in nodes}
        rep = protocol.exchange(
            TRAIN_PHASE,
            contents,
            validate=lambda m: check_rows(
                m, shapes.get(m.metadata.src_node_id, (-1,)), table.dtype
            ),
        )
        good = sorted(rep.replies, key=lambda m: m.metadata.src_node_id)
        row["num_train_replies"] = len(good)
        for node, why in sorted(rep.failures.items()):
            log(WARNING, "[offload] round %d: node %d left out: %s", server_round, node, why)
        if not good:
            log(WARNING, "[offload] round %d: no valid reply; table kept", server_round)
            return RoundOutcome()
        x = {TABLE: table}
        if self.mode == "offload":
            parts = [
                (
                    ids[m.metadata.src_node_id],
                    m.content[ROWS][ROWS].numpy() - table[ids[m.metadata.src_node_id]],
                    float(m.content["metrics"][WEIGHT]),
                )
                for m in good
            ]
            delta_f = scatter_mean_rows(table.shape, parts)
            z = spreadout_steps(table, self.lam, self.server_steps, self.lr)
            delta = parallel_delta({TABLE: delta_f}, {TABLE: z - table}, self.w_f, self.w_c)
            row["server_flops"] = self.server_steps * spreadout_flops(
                len(table) - 1, table.shape[1]
            )
            row["rows_sent_mean"] = float(np.mean([len(ids[m.metadata.src_node_id]) for m in good]))
        else:
            mean = aggregate_arrayrecords(
                [
                    RecordDict({"arrays": ArrayRecord({TABLE: m.content[ROWS][ROWS]}), **_mr(m)})
                    for m in good
                ],
                WEIGHT,
            )
            delta = {TABLE: mean[TABLE].numpy().astype(np.float64) - table}
            row["server_flops"] = 0
            row["rows_sent_mean"] = float(len(table))
        new = apply_delta(x, delta, self.server_lr)[TABLE].astype(table.dtype)
        row["f_c_after"] = fc_value(new, self.lam)
        return RoundOutcome(
            arrays=ArrayRecord({TABLE: Array(new)}), train_metrics=client_means(good)
        )


def _mr(msg: Message) -> dict[str, MetricRecord]:
    return {"metrics": msg.content["metrics"]}


def client_means(replies: list[Message]) -> MetricRecord:
    """Per-client means of :data:`CLIENT_METRICS` and the total ``num-examples``."""
    out: dict[str, float | int] = {
        WEIGHT: int(sum(int(m.content["metrics"][WEIGHT]) for m in replies))
    }
    for key in CLIENT_METRICS:
        vals = [float(m.content["metrics"][key]) for m in replies if key in m.content["metrics"]]
        if vals:
            out[key] = float(np.mean(vals))
    return MetricRecord(out)


def make_offload(cfg: Mapping[str, Any], mode: str, **_: Any) -> OffloadedSpreadout:
    """:class:`OffloadedSpreadout` from the run config."""
    return OffloadedSpreadout(
        mode,
        w_f=cfg["w-f"],
        w_c=cfg["w-c"],
        spreadout_lambda=cfg["spreadout-lambda"],
        server_steps=cfg["server-steps"],
        lr=cfg["lr"],
        server_lr=cfg["server-lr"],
        fraction_train=cfg["fraction-train"],
        min_nodes=1,
        sample_seed=cfg["seed"],
    )
