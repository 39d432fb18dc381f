"""Participation-gap evaluation: the three-way split and the gap metrics, for every app.

Yuan, Morningstar, Ning, Singhal, "What Do We Mean by Generalization in Federated Learning?",
ICLR 2022 (arXiv:2110.14216). Their protocol (and the authors' code, ``generalization/`` of
google-research/federated) separates two generalization gaps:

- a fraction of the clients never participates in training (``unpart_clients_proportion =
  0.2`` in the authors' code): run-config key ``unparticipating-fraction``;
- each participating client's data is split into train and validation (80/20,
  ``train_val_ratio_intra_client = 4``): run-config key ``val-fraction``;
- per client, the metric on *part-train*, *part-val* (participating clients) and *unpart*
  (unparticipating clients, all their data) is measured; the **out-of-sample gap** is
  ``part-train - part-val`` and the **participation gap** is ``part-val - unpart`` (accuracy:
  positive = worse on unseen data / unseen clients), with the mean and the 10/50/90
  percentiles over clients.

An app turns it on by composing :data:`flowerbed.common.config.PARTICIPATION` into its schema
(off by default: ``unparticipating-fraction = 0``), wrapping its strategy with
:func:`with_participation` (training samples only participating nodes; every ``gap-eval-every``
rounds every node, unparticipating ones included, gets one ``evaluate`` message) and answering
that message in its ClientApp with :func:`evaluate_splits`. With the option on,
:func:`flowerbed.common.client.partition_tensors` returns a participating client's *train*
slice only, so the app's training step needs no change.

Which partitions never participate is a function of (run seed, number of partitions) only,
and each client's train/validation split of (run seed, partition id): never of spawn order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flowerbed.common.seeding import derive_seed

#: evaluate-config key: "evaluate every split of this client for the gap metrics"
GAP_EVAL = "participation-eval"
#: metric names of an evaluate reply (per split) and of the participation flag
SPLITS = ("part-train", "part-val", "unpart")
PARTICIPATING = "participating"
PERCENTILES = (10, 50, 90)
_SALT_UNPART = 0x9A47
_SALT_VAL = 0x7A1D


class ParticipationError(RuntimeError):
    """An unparticipating partition was asked to train (it must never be)."""


# ----------------------------------------------------------------------------- the split
def is_on(cfg: Mapping[str, Any]) -> bool:
    """Whether the run config turns the three-way split on (``unparticipating-fraction > 0``)."""
    return float(cfg.get("unparticipating-fraction", 0.0)) > 0


def unparticipating_partitions(num_partitions: int, fraction: float, seed: int) -> list[int]:
    """The partition ids that never train: ``floor(fraction * num_partitions)`` of them (at
    least one when ``fraction > 0`` and at least one partition is left to train), drawn from
    the run seed; sorted.

    Raises
    ------
    ValueError
        If ``fraction`` is not in [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"unparticipating-fraction={fraction!r}: must be in [0, 1)")
    if fraction == 0 or num_partitions < 2:
        return []
    k = min(max(int(math.floor(fraction * num_partitions)), 1), num_partitions - 1)
    rng = np.random.default_rng(derive_seed(seed, num_partitions, _SALT_UNPART))
    return sorted(int(i) for i in rng.choice(num_partitions, size=k, replace=False))


def split_train_val(
    indices: np.ndarray, val_fraction: float, seed: int, partition_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """One participating client's ``(train, validation)`` index arrays: a shuffle seeded by
    (run seed, partition id), ``round(val_fraction * n)`` examples to validation, at least one
    left to train; each part keeps the original order of ``indices``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val-fraction={val_fraction!r}: must be in [0, 1)")
    indices = np.asarray(indices)
    n = len(indices)
    n_val = min(int(round(val_fraction * n)), max(n - 1, 0))
    rng = np.random.default_rng(derive_seed(seed, partition_id, _SALT_VAL))
    val_pos = np.sort(rng.permutation(n)[:n_val])
    mask = np.zeros(n, dtype=bool)
    mask[val_pos] = True
    return indices[~mask], indices[mask]


def split_of(
    cfg: Mapping[str, Any], indices: np.ndarray, partition_id: int, num_partitions: int, part: str
) -> np.ndarray:
    """The rows of partition ``partition_id`` (``indices``) that ``part`` names.

    ``part``: ``"all"`` (the whole partition), ``"train"`` (what the client trains on: the whole
    partition when the split is off, the train slice of a participating client, nothing for an
    unparticipating one), ``"val"`` (the validation slice) or ``"unpart"`` (an unparticipating
    client's whole data).
    """
    if part == "all" or (part == "train" and not is_on(cfg)):
        return indices
    if part not in ("train", "val", "unpart"):
        raise ValueError(f"unknown split {part!r}; known: all, train, val, unpart")
    unpart = partition_id in unparticipating_partitions(
        num_partitions, float(cfg["unparticipating-fraction"]), int(cfg["seed"])
    )
    if part == "unpart":
        return indices if unpart else indices[:0]
    if unpart:
        return indices[:0]
    train, val = split_train_val(
        indices, float(cfg["val-fraction"]), int(cfg["seed"]), partition_id
    )
    return train if part == "train" else val


def check_may_train(cfg: Mapping[str, Any], partition_id: int, num_partitions: int) -> None:
    """Raise :class:`ParticipationError` if this partition is unparticipating (a ClientApp calls
    it before training: the server never samples it, this guards against a misconfigured one)."""
    if is_on(cfg) and partition_id in unparticipating_partitions(
        num_partitions, float(cfg["unparticipating-fraction"]), int(cfg["seed"])
    ):
        raise ParticipationError(
            f"partition {partition_id} is unparticipating (unparticipating-fraction="
            f"{cfg['unparticipating-fraction']}, seed={cfg['seed']}) and must not train"
        )


# ----------------------------------------------------------------------------- client side
def evaluate_splits(
    cfg: Mapping[str, Any],
    partition_id: int,
    num_partitions: int,
    score: Callable[[str], Mapping[str, float]],
    label_counts: Callable[[str], Sequence[int]] | None = None,
) -> dict[str, float | int | list[int]]:
    """The metrics of a gap-evaluation reply.

    ``score(part)`` evaluates the received model on this client's ``part`` (``"train"``,
    ``"val"`` or ``"unpart"``, see :func:`split_of`) and returns ``{"accuracy": ..., "loss":
    ..., "num-examples": n}`` and optionally ``"class-correct"`` (correct examples per class,
    :func:`flowerbed.common.train.evaluate` with ``num_classes``: the per-class accuracy
    the analysis of the gap uses). A participating client answers ``part-train-*`` and
    ``part-val-*``, an unparticipating one ``unpart-*``; both answer ``participating`` (1/0)
    and ``num-examples`` (the total). Per split the reply also carries ``<split>-num-examples``
    (for the example-weighted means and the per-client rows) and, when ``label_counts(part)``
    is given (e.g. :func:`flowerbed.common.client.split_label_counts`), the split's label
    histogram ``<split>-label-counts`` (a list of ints, one per class).
    """
    unpart = partition_id in unparticipating_partitions(
        num_partitions, float(cfg["unparticipating-fraction"]), int(cfg["seed"])
    )
    out: dict[str, float | int | list[int]] = {PARTICIPATING: 0 if unpart else 1}
    parts = (("unpart", "unpart"),) if unpart else (("part-train", "train"), ("part-val", "val"))
    total = 0
    for name, part in parts:
        metrics = dict(score(part))
        n_part = int(metrics.pop("num-examples", 0))
        total += n_part
        out.update(
            {
                f"{name}-{k}": [int(c) for c in v] if isinstance(v, list | tuple) else float(v)
                for k, v in metrics.items()
            }
        )
        out[f"{name}-num-examples"] = n_part
        if label_counts is not None:
            out[f"{name}-label-counts"] = [int(c) for c in label_counts(part)]
    out["num-examples"] = max(total, 1)
    return out


def is_gap_evaluation(msg: Message) -> bool:
    """Whether ``msg`` is the gap evaluation of :class:`Participation` (its config says so)."""
    conf = msg.content.config_records.get("config")
    return bool(conf is not None and conf.get(GAP_EVAL, False))


# ----------------------------------------------------------------------------- server side
def check_gap_reply(msg: Message, unpart_nodes: set[int], metric: str = "accuracy") -> str | None:
    """Why a gap-evaluation reply must be left out (a named reason), or None.

    Checks: no error, one MetricRecord, the ``participating`` flag agreeing with what the
    server knows of the node, the split metrics of its role present and finite.
    """
    if msg.has_error():
        return f"error reply: {msg.error.reason[:200]}"
    records = list(msg.content.metric_records.values())
    if len(records) != 1:
        return f"expected one MetricRecord, got {len(records)}"
    m = records[0]
    expect = 0 if msg.metadata.src_node_id in unpart_nodes else 1
    if m.get(PARTICIPATING) != expect:
        return f"participating={m.get(PARTICIPATING)!r}, the server expects {expect}"
    names = ("unpart",) if expect == 0 else ("part-train", "part-val")
    for name in names:
        v = m.get(f"{name}-{metric}")
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            return f"metric {name}-{metric}={v!r} is missing or not finite"
        n = m.get(f"{name}-num-examples")  # optional (replies of older ClientApps lack it)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            return f"{name}-num-examples={n!r} is not a positive int"
        counts = m.get(f"{name}-label-counts")  # optional
        if counts is not None:
            if not isinstance(counts, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
            ):
                return f"{name}-label-counts is not a list of non-negative ints"
            if n is not None and sum(counts) != n:
                return f"{name}-label-counts sum to {sum(counts)}, not {name}-num-examples={n}"
        hits = m.get(f"{name}-class-correct")  # optional; needs the label counts
        if hits is not None:
            if counts is None or not isinstance(hits, list) or len(hits) != len(counts):
                return f"{name}-class-correct does not match {name}-label-counts"
            if not all(
                isinstance(h, int) and 0 <= h <= c for h, c in zip(hits, counts, strict=True)
            ):
                return f"{name}-class-correct is not within 0..label count per class"
            if metric == "accuracy" and abs(sum(hits) - v * sum(counts)) > 0.5:
                return f"{name}-class-correct sums to {sum(hits)}, not {name}-{metric}={v:.4f}"
    return None


def label_entropy(counts: Sequence[int]) -> float:
    """Shannon entropy (bits) of a label histogram: 0 for one label, log2(k) for k equal ones."""
    c = np.asarray(counts, dtype=float)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0


def client_row(metrics: Mapping[str, Any], partition_id: int) -> dict[str, Any]:
    """One evaluated client's row of ``gap_clients`` (``results.json``, per gap round).

    ``partition_id`` (the server's map, not the client's word), ``participating`` (1/0) and,
    per split it answered (``part_train``, ``part_val`` or ``unpart``): ``<split>_accuracy``,
    ``<split>_loss``, ``<split>_num_examples`` and, when the ClientApp sends its label
    histogram, ``<split>_label_counts`` and ``<split>_label_entropy`` (bits), and its
    correct examples per class, ``<split>_class_correct``.
    """
    row: dict[str, Any] = {
        "partition_id": int(partition_id),
        PARTICIPATING: int(metrics[PARTICIPATING]),
    }
    for split in SPLITS:
        prefix, key = f"{split}-", split.replace("-", "_")
        for name, v in metrics.items():
            if name.startswith(prefix):
                row[f"{key}_{name[len(prefix) :].replace('-', '_')}"] = (
                    [int(c) for c in v] if isinstance(v, list) else v
                )
        if f"{key}_label_counts" in row:
            row[f"{key}_label_entropy"] = label_entropy(row[f"{key}_label_counts"])
    return row


def gap_summary(
    rows: Iterable[Mapping[str, float]], metrics: tuple[str, ...] = ("accuracy", "loss")
) -> dict[str, float]:
    """The gap metrics from the per-client replies (``evaluate_splits`` rows).

    For each metric ``m`` and split ``s`` (``part_train``, ``part_val``, ``unpart``):
    ``s_m_mean`` (unweighted mean over clients, as the paper reports per-client metrics) and
    ``s_m_p10/p50/p90``; ``out_of_sample_gap_m = part_train_m_mean - part_val_m_mean``,
    ``participation_gap_m = part_val_m_mean - unpart_m_mean`` and the percentiles of the
    per-client out-of-sample gap ``out_of_sample_gap_m_p10/p50/p90``; ``num_part_clients`` and
    ``num_unpart_clients``. A side with no client gives no entry for it.

    When every reply of a split carries ``<split>-num-examples`` (ClientApps of this version),
    the example-weighted means ``s_m_wmean`` (the authors' code logs both, ``avg`` and
    ``wavg``) and the gaps between them, ``out_of_sample_gap_m_weighted`` and
    ``participation_gap_m_weighted``, are added.
    """
    rows = list(rows)
    out: dict[str, float] = {
        "num_part_clients": sum(1 for r in rows if r.get(PARTICIPATING) == 1),
        "num_unpart_clients": sum(1 for r in rows if r.get(PARTICIPATING) == 0),
    }
    for m in metrics:
        means, wmeans = {}, {}
        for split in SPLITS:
            have = [r for r in rows if f"{split}-{m}" in r]
            vals = np.array([r[f"{split}-{m}"] for r in have], float)
            if len(vals) == 0:
                continue
            key = split.replace("-", "_")
            means[split] = out[f"{key}_{m}_mean"] = float(vals.mean())
            weights = [r.get(f"{split}-num-examples") for r in have]
            if all(isinstance(w, int) and w > 0 for w in weights):
                w = np.array(weights, float)
                wmeans[split] = out[f"{key}_{m}_wmean"] = float((w * vals).sum() / w.sum())
            for q, v in zip(PERCENTILES, np.percentile(vals, PERCENTILES), strict=True):
                out[f"{key}_{m}_p{q}"] = float(v)
        if "part-train" in means and "part-val" in means:
            out[f"out_of_sample_gap_{m}"] = means["part-train"] - means["part-val"]
            per = np.array(
                [r[f"part-train-{m}"] - r[f"part-val-{m}"] for r in rows if f"part-val-{m}" in r]
            )
            for q, v in zip(PERCENTILES, np.percentile(per, PERCENTILES), strict=True):
                out[f"out_of_sample_gap_{m}_p{q}"] = float(v)
        if "part-val" in means and "unpart" in means:
            out[f"participation_gap_{m}"] = means["part-val"] - means["unpart"]
        if "part-train" in wmeans and "part-val" in wmeans:
            out[f"out_of_sample_gap_{m}_weighted"] = wmeans["part-train"] - wmeans["part-val"]
        if "part-val" in wmeans and "unpart" in wmeans:
            out[f"participation_gap_{m}_weighted"] = wmeans["part-val"] - wmeans["unpart"]
    return out


class _ParticipatingGrid:
    """A view of a grid whose ``get_node_ids`` lists only the participating nodes (what the
    inner strategy samples from); everything else goes to the real grid."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class Participation(Strategy):
    """``strategy`` trained on the participating clients only, evaluated on all three splits.

    Parameters
    ----------
    strategy : Strategy
        The inner strategy (Flower's or flowerbed's); it samples its training nodes from the
        participating ones only.
    fraction : float
        ``unparticipating-fraction`` in [0, 1) (see :func:`unparticipating_partitions`).
    seed : int
        The run seed.
    eval_every : int, default 1
        Gap evaluation every ``eval_every`` rounds (and always in the last round).
    num_rounds : int, default 0
        The run's number of rounds (for the last-round evaluation; 0: unknown).
    metric : str, default "accuracy"
        The metric the replies must carry (validation).

    The node -> partition map comes from the ClientApps' ``query`` handler
    (:func:`flowerbed.common.client.add_partition_query`), asked once. Per round,
    :attr:`history` has ``unparticipating_partitions``, ``num_gap_replies``, the rejected
    replies with their reasons (``gap_rejected``) and, in gap-evaluation rounds, one row per
    accepted reply (``gap_clients``, :func:`client_row`: partition id, role, per split the
    metrics, number of examples and label histogram), which ``run_strategy`` writes into
    the round's row of ``results.json``.
    """

    def __init__(
        self,
        strategy: Strategy,
        fraction: float,
        seed: int,
        eval_every: int = 1,
        num_rounds: int = 0,
        metric: str = "accuracy",
    ) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"unparticipating-fraction={fraction!r}: must be in (0, 1)")
        self.strategy, self.fraction, self.seed = strategy, fraction, seed
        self.eval_every, self.num_rounds, self.metric = max(int(eval_every), 1), num_rounds, metric
        self._pids: dict[int, int] = {}
        self._unpart_pids: list[int] = []
        self._history: dict[int, dict] = {}
        self.trained_nodes: set[int] = set()  # every node sent a train message (tests)

    @property
    def history(self) -> dict[int, dict]:
        """The inner strategy's rows (if it keeps any) with the participation columns."""
        inner = getattr(self.strategy, "history", None) or {}
        rounds = sorted(set(inner) | set(self._history))
        return {r: {**inner.get(r, {}), **self._history.get(r, {})} for r in rounds}

    def summary(self) -> None:
        """Log the split, then the inner strategy."""
        log(INFO, "\t├──> Participation: %.2f of the clients never train", self.fraction)
        log(INFO, "\t├──> gap evaluation every %d round(s)", self.eval_every)
        self.strategy.summary()

    def _nodes(self, grid: Grid) -> tuple[list[int], list[int]]:
        """``(participating, unparticipating)`` node ids; partitions asked once per new node."""
        nodes = sorted(grid.get_node_ids())
        new = [n for n in nodes if n not in self._pids]
        if new:
            from flowerbed.strategies.fedavg import query_partitions

            pmap, nparts = query_partitions(grid, new)
            self._pids.update(pmap)
            nparts = max(nparts, max(self._pids.values(), default=-1) + 1)
            self._unpart_pids = unparticipating_partitions(nparts, self.fraction, self.seed)
        unpart = set(self._unpart_pids)
        known = [n for n in nodes if n in self._pids]
        return [n for n in known if self._pids[n] not in unpart], [
            n for n in known if self._pids[n] in unpart
        ]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid: Grid):
        """The inner strategy's train messages, sampled from the participating nodes only."""
        part, _ = self._nodes(grid)
        msgs = list(self.strategy.configure_train(server_round, arrays, config, _view(grid, part)))
        leaked = [m.metadata.dst_node_id for m in msgs if m.metadata.dst_node_id not in part]
        if leaked:  # an inner strategy that ignored the view: never train those
            log(WARNING, "round %d: dropped train messages to unparticipating nodes", server_round)
            msgs = [m for m in msgs if m.metadata.dst_node_id in part]
        self.trained_nodes.update(m.metadata.dst_node_id for m in msgs)
        self._history.setdefault(server_round, {})["unparticipating_partitions"] = list(
            self._unpart_pids
        )
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config, grid: Grid):
        """One ``evaluate`` message to every node (both sides) in gap-evaluation rounds."""
        last = self.num_rounds and server_round == self.num_rounds
        if server_round % self.eval_every and not last:
            return []
        part, unpart = self._nodes(grid)
        conf = ConfigRecord({**dict(config), "server-round": server_round, GAP_EVAL: True})
        return [
            Message(
                content=RecordDict({"arrays": arrays, "config": conf}),
                message_type=MessageType.EVALUATE,
                dst_node_id=node,
                group_id=str(server_round),
            )
            for node in part + unpart
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        """The gap metrics (:func:`gap_summary`) over the valid replies; rejected ones are
        counted with their reasons and left out."""
        unpart_nodes = {n for n, p in self._pids.items() if p in set(self._unpart_pids)}
        rows, rejected, clients = [], [], []
        for msg in replies:
            why = check_gap_reply(msg, unpart_nodes, self.metric)
            if why is None:
                rows.append(dict(next(iter(msg.content.metric_records.values()))))
                pid = self._pids.get(msg.metadata.src_node_id, -1)
                clients.append(client_row(rows[-1], pid))
            else:
                rejected.append(f"node {msg.metadata.src_node_id}: {why}")
                log(WARNING, "round %d: gap reply rejected: %s", server_round, why)
        row = self._history.setdefault(server_round, {})
        row["num_gap_replies"] = len(rows)
        row["gap_clients"] = sorted(clients, key=lambda c: c["partition_id"])
        if rejected:
            row["gap_rejected"] = rejected
        return MetricRecord(gap_summary(rows)) if rows else None

    # checkpoint / resume: the inner strategy's state and the gap rows
    def state_dict(self) -> dict:
        own = {"gap_history": {str(k): v for k, v in self._history.items()}}
        return {
            **(self.strategy.state_dict() if hasattr(self.strategy, "state_dict") else {}),
            **own,
        }

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self._history = {int(k): dict(v) for k, v in state.pop("gap_history", {}).items()}
        if hasattr(self.strategy, "load_state_dict"):
            self.strategy.load_state_dict(state)


def _view(grid: Grid, nodes: list[int]):
    return _ParticipatingGrid(grid, nodes)


def with_participation(strategy: Strategy, cfg: Mapping[str, Any]) -> Strategy:
    """``strategy`` wrapped in :class:`Participation` when the run config turns the split on
    (``unparticipating-fraction > 0``); unchanged otherwise."""
    if not is_on(cfg):
        return strategy
    from flowerbed.common.protocol import PhasedStrategy

    if isinstance(strategy, PhasedStrategy):
        raise ParticipationError(
            f"unparticipating-fraction={cfg['unparticipating-fraction']} needs a one-exchange "
            f"strategy; {type(strategy).__name__} (method {cfg.get('method')!r}) is phased"
        )
    return Participation(
        strategy,
        float(cfg["unparticipating-fraction"]),
        int(cfg["seed"]),
        eval_every=int(cfg.get("gap-eval-every", 1)),
        num_rounds=int(cfg.get("num-server-rounds", 0)),
    )


def final_gaps(result, num_rounds: int) -> dict[str, float]:
    """The last gap evaluation of a run (``result.evaluate_metrics_clientapp``), for ``final``."""
    rounds = [r for r in result.evaluate_metrics_clientapp if r <= num_rounds]
    for rnd in sorted(rounds, reverse=True):
        metrics = dict(result.evaluate_metrics_clientapp[rnd])
        if "num_part_clients" in metrics:
            return metrics
    return {}
