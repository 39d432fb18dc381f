"""FedAvg with the guards every flowerbed strategy builds on.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017 (arXiv:1602.05629). The averaging is Flower's own
(:class:`flwr.serverapp.strategy.FedAvg`); this subclass adds what a research run needs:

- every reply is checked before it is averaged: one ArrayRecord with the global model's keys,
  shapes and dtypes, only finite values, a finite positive weight, and optionally an update norm
  below ``max_update_norm``; a bad reply is logged with its reason and left out;
- failed replies (a ClientApp that raised, timed out or died) are counted with their reasons;
  if fewer than ``min_train_replies`` valid replies arrive, the global model is kept unchanged;
- replies that never arrive (a ClientApp that hung past the round timeout or whose process died
  without an error reply) are counted as ``num_timeouts``;
- valid replies are averaged in an order fixed by their content (not by arrival order), so a
  run is bitwise reproducible whatever order the clients finish in;
- bytes sent and received are counted by the protocol layer that runs every strategy
  (:mod:`flowerbed.common.protocol`), with one definition for all apps;
- with ``sample_seed`` set, the clients of each round are a function of (seed, round) over the
  partition ids, not of node ids or Ray's scheduling (see
  :func:`flowerbed.common.seeding.sample_partitions`).

Per-round bookkeeping is in :attr:`FedAvg.history` (``{round: {...}}``).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as _FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flowerbed.common.protocol import error_summary
from flowerbed.common.records import check_arrays
from flowerbed.common.seeding import sample_partitions

PARTITION_ID = "partition-id"


class FedAvg(_FlowerFedAvg):
    """Federated Averaging with reply validation, failure accounting and byte counting.

    Parameters
    ----------
    fraction_train : float, default 1.0
        Fraction of nodes sampled for training each round.
    fraction_evaluate : float, default 1.0
        Fraction of nodes sampled for federated evaluation (0 disables it).
    min_train_nodes : int, default 2
        Minimum number of nodes sampled for training.
    min_evaluate_nodes : int, default 2
        Minimum number of nodes sampled for evaluation.
    min_available_nodes : int, default 2
        Nodes that must be connected before a round starts.
    weighted_by_key : str, default "num-examples"
        Reply metric used as the averaging weight.
    arrayrecord_key : str, default "arrays"
        Key of the ArrayRecord in messages.
    configrecord_key : str, default "config"
        Key of the ConfigRecord in messages.
    train_metrics_aggr_fn : callable or None, default None
        ``(list[RecordDict], str) -> MetricRecord``; weighted mean if None.
    evaluate_metrics_aggr_fn : callable or None, default None
        As above, for evaluation replies.
    max_update_norm : float or None, default None
        Reject replies whose L2 distance to the global model exceeds this (None: no bound).
    min_train_replies : int, default 1
        Valid training replies needed to update the global model; with fewer, it is kept.
    sample_seed : int or None, default None
        If set, sample clients by partition id with this seed (reproducible across runs);
        needs the ClientApp to answer ``query`` messages with its partition id
        (:func:`flowerbed.common.client.add_partition_query`). None: Flower's random sampling.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        max_update_norm: float | None = None,
        min_train_replies: int = 1,
        sample_seed: int | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.max_update_norm = max_update_norm
        self.min_train_replies = min_train_replies
        self.sample_seed = sample_seed
        self.history: dict[int, dict] = {}
        self._global: ArrayRecord | None = None
        self._partition_of: dict[int, int] | None = None

    # ------------------------------------------------------------------ summary
    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(INFO, "\t└──> Guards:")
        log(INFO, "\t\t├── max_update_norm: %s", self.max_update_norm)
        log(INFO, "\t\t├── min_train_replies: %d", self.min_train_replies)
        log(INFO, "\t\t└── sample_seed: %s", self.sample_seed)

    # ------------------------------------------------------------------ sampling
    def _round(self, server_round: int) -> dict:
        return self.history.setdefault(
            server_round,
            {"num_failures": 0, "num_rejected": 0},
        )

    def _partition_map(self, grid: Grid, node_ids: list[int]) -> dict[int, int]:
        """Ask every node for its partition id (one ``query`` message each), once."""
        if self._partition_of is not None and set(node_ids) <= set(self._partition_of):
            return self._partition_of
        self._partition_of, _ = query_partitions(grid, node_ids)
        return self._partition_of

    def _sample(self, grid: Grid, server_round: int, fraction: float, min_nodes: int) -> list[int]:
        while len(node_ids := sorted(grid.get_node_ids())) < max(
            self.min_available_nodes, min_nodes
        ):
            log(INFO, "Waiting for nodes: %d connected", len(node_ids))
            time.sleep(1.0)
        k = min(max(int(len(node_ids) * fraction), min_nodes), len(node_ids))
        if k == len(node_ids):
            return node_ids
        if self.sample_seed is None:
            return random.sample(node_ids, k)
        pmap = self._partition_map(grid, node_ids)
        by_pid = {p: n for n, p in pmap.items() if n in node_ids}
        present = sorted(by_pid)
        if present == list(range(len(present))):  # every partition 0..n-1 (the usual case)
            pids = sample_partitions(self.sample_seed, server_round, max(by_pid) + 1, k)
        else:  # a subset (e.g. only the participating ones): sample k among those present
            pos = sample_partitions(
                self.sample_seed, server_round, len(present), min(k, len(present))
            )
            pids = [present[i] for i in pos]
        chosen = [by_pid[p] for p in pids if p in by_pid]
        return chosen or random.sample(node_ids, k)

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send them the global model and ``config``."""
        if self.fraction_train == 0.0:
            return []
        self._global = arrays
        node_ids = self._sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        log(INFO, "configure_train: sampled %d nodes", len(node_ids))
        config["server-round"] = server_round
        self._round(server_round)["num_sampled"] = len(node_ids)
        record = self.message_record(arrays, config)
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def message_record(self, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        """Content of the train and evaluate messages (override to send more than the model)."""
        return RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})

    #: names of ArrayRecords a reply may carry besides the model (a subclass's extra payload,
    #: checked by its own :meth:`check_reply`)
    extra_arrayrecords: tuple[str, ...] = ()

    def check_reply(self, msg: Message, is_train: bool) -> str | None:
        """Why the reply ``msg`` must be left out, or None. Subclasses may extend it."""
        content = msg.content
        metrics = list(content.metric_records.values())
        if len(metrics) != 1:
            return f"expected one MetricRecord, got {len(metrics)}"
        weight = metrics[0].get(self.weighted_by_key)
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            return f"weight {self.weighted_by_key!r}={weight!r} is not a finite positive number"
        for k, v in metrics[0].items():
            vals = v if isinstance(v, list) else [v]
            if any(isinstance(x, float) and not math.isfinite(x) for x in vals):
                return f"metric {k!r} is not finite"
        if is_train:
            model = [k for k in content.array_records if k not in self.extra_arrayrecords]
            if len(model) != 1:
                return f"expected one ArrayRecord, got {len(model)}"
            arrays = content[model[0]]
            return check_arrays(arrays, self._global, self.max_update_norm)
        return None

    def filter_replies(
        self, server_round: int, replies: Iterable[Message], is_train: bool
    ) -> list[Message]:
        """Replies that carry no error and pass :meth:`check_reply`; the rest are counted."""
        rnd = self._round(server_round)
        good, reasons = [], []
        replies = list(replies)
        if is_train and "num_sampled" in rnd:
            missing = max(0, rnd["num_sampled"] - len(replies))
            rnd["num_timeouts"] = missing
            if missing:
                reasons.append(f"{missing} node(s): no reply within the round timeout")
                log(WARNING, "round %d: %d sampled node(s) did not reply", server_round, missing)
        for msg in replies:
            if msg.has_error():
                rnd["num_failures"] += 1
                reasons.append(
                    f"node {msg.metadata.src_node_id}: error {error_summary(msg.error.reason)}"
                )
                continue
            why = self.check_reply(msg, is_train)
            if why is not None:
                rnd["num_rejected"] += 1
                reasons.append(f"node {msg.metadata.src_node_id}: rejected, {why}")
                log(
                    WARNING,
                    "round %d: rejected reply from node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    why,
                )
                continue
            good.append(msg)
        if reasons:
            rnd.setdefault("failure_reasons", []).extend(r[:300] for r in reasons)
        key = "num_train_replies" if is_train else "num_evaluate_replies"
        rnd[key] = len(good)
        # arrival order must not change the float sums
        good.sort(key=lambda m: _content_key(m, self.weighted_by_key))
        return good

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted average of the valid replies (None if fewer than ``min_train_replies``)."""
        good = self.filter_replies(server_round, replies, is_train=True)
        if len(good) < max(self.min_train_replies, 1):
            log(
                WARNING,
                "round %d: %d valid replies < min_train_replies=%d; model kept",
                server_round,
                len(good),
                self.min_train_replies,
            )
            return None, None
        contents = [m.content for m in good]
        arrays = self.aggregate_arrays(server_round, contents)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics

    def valid_updates(self, server_round: int, replies: Iterable[Message]):
        """For rules on update vectors (FLTrust, FedIDM): ``(good, keys, w, updates)`` with the
        valid replies, the model's keys, the global model as one vector and each reply's update
        ``w_k - w`` as a row; None if fewer than ``min_train_replies`` are valid."""
        from flowerbed.common.attacks import flatten

        good = self.filter_replies(server_round, replies, is_train=True)
        if len(good) < max(self.min_train_replies, 1):
            return None
        keys = list(self._global.keys())
        w = flatten(self._global, keys)
        updates = np.stack([flatten(m.content[self.arrayrecord_key], keys) - w for m in good])
        return good, keys, w, updates

    def aggregate_arrays(self, server_round: int, contents: list[RecordDict]) -> ArrayRecord:
        """Weighted mean of the replies' arrays (override for other aggregation rules)."""
        return aggregate_arrayrecords(contents, self.weighted_by_key)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-serialisable state needed to resume a run (per-round bookkeeping)."""
        return {"history": {str(k): v for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output."""
        self.history = {int(k): dict(v) for k, v in state.get("history", {}).items()}

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes for federated evaluation."""
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self._sample(grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes)
        config["server-round"] = server_round
        record = self.message_record(arrays, config)
        return self._construct_messages(record, node_ids, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of the valid evaluation replies' metrics."""
        good = self.filter_replies(server_round, replies, is_train=False)
        if not good:
            return None
        return self.evaluate_metrics_aggr_fn([m.content for m in good], self.weighted_by_key)


def query_partitions(grid: Grid, node_ids: list[int]) -> tuple[dict[int, int], int]:
    """``({node_id: partition_id}, num_partitions)`` from one ``query`` message per node.

    Needs the ClientApp's partition handler (:func:`flowerbed.common.client.add_partition_query`).
    Used by seeded sampling (:class:`FedAvg`) and by the attack wrapper
    (:class:`flowerbed.common.attacks.Attacked`).
    """
    msgs = [
        Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
        for n in node_ids
    ]
    mapping, num_partitions = {}, 0
    for rep in grid.send_and_receive(msgs, timeout=600):
        if not rep.has_error() and "metrics" in rep.content.metric_records:
            metrics = rep.content["metrics"]
            mapping[rep.metadata.src_node_id] = int(metrics[PARTITION_ID])
            num_partitions = max(num_partitions, int(metrics.get("num-partitions", 0)))
    if len(mapping) != len(node_ids):
        log(WARNING, "partition query: %d of %d nodes answered", len(mapping), len(node_ids))
    return mapping, num_partitions


def _content_key(msg: Message, weight_key: str) -> tuple:
    """Order of a reply fixed by what is averaged: digest of its arrays and its weight.

    Other metrics stay out: a wall-time metric would make the order, and so the float sums,
    differ from run to run.
    """
    h = hashlib.sha1()
    for rec in msg.content.array_records.values():
        for k, a in rec.items():
            h.update(k.encode())
            h.update(a.data)
            h.update(len(a.data).to_bytes(8, "little"))
    for rec in msg.content.metric_records.values():
        h.update(repr(rec.get(weight_key)).encode())
    return (h.hexdigest(), msg.metadata.src_node_id)
