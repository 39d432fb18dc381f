"""FedTA server: Selective Input Knowledge Fusion and Best Global Prototype Selection.

Hao Yu, Xin Yang, Le Zhang, Hanlin Gu, Tianrui Li, Lixin Fan, Qiang Yang, "Handling
Spatial-Temporal Data Heterogeneity for Federated Continual Learning via Tail Anchor", CVPR 2025
(arXiv:2412.18355).

Clients upload their Input-Enhancement prompt pool (``arrays``: ``prompts (M, L, D)`` and
``keys (M, D)``) and their local class prototypes (``protos``: ``p.<class>`` with the prototype
and ``k.<class>`` with the tail-anchor key it matched, both ``(D,)``). The server

- fuses the pools by **SIKF** (Eq. 8, :func:`sikf`): one uploaded pool, drawn at random, is
  distilled so that the frozen backbone's features of the surrogate set enhanced with it match
  (MSE) those enhanced with every other uploaded pool; the keys are averaged (Reconstruction:
  the paper does not say whether keys are distilled); ``use_sikf=False`` (the "w/o SIKF"
  ablation) averages the prompts, weighted by ``num-examples``;
- selects global prototypes by **BGPS** (Eqs. 9-10, :func:`bgps`): per class, the uploaded
  prototype least similar on average to the prototypes of the other classes; it is frozen for
  good when that mean similarity is below ``bgps_thr``; ``use_bgps=False`` (the "w/o BGPS"
  ablation) takes the plain mean of the uploaded prototypes of each class, never frozen;
- sends back the global pool (``arrays``), the global prototypes (``protos``: ``g.<class>``) and
  the list of frozen classes (config ``frozen-classes``).

The federated continual-learning schedule is :class:`ContinualSchedule`, shared by FedTA and the
baselines (:class:`ContinualFedAvg`): round ``r`` belongs to task ``(r - 1) // rounds_per_task``;
its train config carries ``task``, ``round-in-task`` and ``bgps-freeze`` (whether BGPS may
freeze in this round: from round ``bgps_warmup`` of each task and from server round
``bgps_start_round`` of the run); federated evaluation runs only on the last round of each task, with the
classes the federation has seen (``seen-classes``); the strategy keeps the per-task evaluations
and computes the final metrics (``acc_t<k>``, KR_t Eq. 11, KR_s Eq. 12, upload per client and
round) with :meth:`ContinualSchedule.final_metrics`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from logging import INFO, WARNING
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid

from flowerbed.common.models import prompted_features
from flowerbed.common.records import check_arrays, wire_nbytes
from flowerbed.common.seeding import derive_seed
from flowerbed.strategies.fedavg import FedAvg

PROTO_KEY = re.compile(r"^([pk])\.(\d+)$")


# ---------------------------------------------------------------------------- BGPS (Eqs. 9-10)
def bgps(
    local: list[tuple[int, np.ndarray]],
    previous: dict[int, np.ndarray],
    frozen: set[int],
    thr: float,
    allow_freeze: bool = True,
) -> tuple[dict[int, np.ndarray], set[int], dict[int, float]]:
    """Best Global Prototype Selection.

    Parameters
    ----------
    local : list of (int, np.ndarray)
        Uploaded local prototypes ``(class, vector (D,))``.
    previous : dict
        Current global prototypes ``{class: vector}``; classes not uploaded in this round (and
        frozen classes) enter the similarity matrix with these vectors and keep them.
    frozen : set of int
        Classes whose global prototype is frozen (never replaced).
    thr : float
        Freezing threshold on the row mean of the similarity matrix (Eq. 10).
    allow_freeze : bool, default True
        Whether a prototype may be frozen in this round.

    Returns
    -------
    (global, frozen, scores)
        New global prototypes, the updated frozen set, and the row-mean similarity of each
        selected prototype ``{class: mean}``.

    Notes
    -----
    ``P_G`` holds the uploaded prototypes of the non-frozen classes plus the current global
    prototype of every other known class, ordered by class. ``M_ij = cos(P_i, P_j)``, set to 1
    when ``i`` and ``j`` share a class; the selected prototype of class ``y`` is the one with the
    lowest row mean (Eq. 9), and it is frozen when that mean is below ``thr`` (Eq. 10).
    """
    entries = [(c, np.asarray(v, np.float64)) for c, v in local if c not in frozen]
    uploaded = {c for c, _ in entries}
    entries += [(c, np.asarray(v, np.float64)) for c, v in previous.items() if c not in uploaded]
    entries.sort(key=lambda e: e[0])
    out = {c: np.asarray(v) for c, v in previous.items()}
    frozen = set(frozen)
    if not entries:
        return out, frozen, {}
    cls = np.array([c for c, _ in entries])
    p = np.stack([v for _, v in entries])
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    m = p @ p.T
    m[cls[:, None] == cls[None, :]] = 1.0
    row = m.mean(axis=1)
    scores = {}
    dtype = next(iter(local))[1].dtype if local else np.float32
    for c in sorted(uploaded):
        rows = np.flatnonzero(cls == c)
        # entries of class c are all uploads (c is uploaded, so no previous vector was added)
        best = rows[np.argmin(row[rows])]
        out[c] = entries[best][1].astype(dtype)
        scores[c] = float(row[best])
        if allow_freeze and row[best] < thr:
            frozen.add(c)
    return out, frozen, scores


def mean_prototypes(
    local: list[tuple[int, np.ndarray]], previous: dict[int, np.ndarray]
) -> dict[int, np.ndarray]:
    """The "w/o BGPS" rule: per uploaded class, the plain mean of its uploaded prototypes."""
    out = {c: np.asarray(v) for c, v in previous.items()}
    by_class: dict[int, list[np.ndarray]] = {}
    for c, v in local:
        by_class.setdefault(c, []).append(np.asarray(v))
    for c, vs in by_class.items():
        out[c] = np.mean(vs, axis=0).astype(vs[0].dtype)
    return out


# ---------------------------------------------------------------------------- SIKF (Eq. 8)
def average_pools(
    pools: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted average of the prompts and of the keys of several pools (the w/o SIKF rule)."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).float()
    prompts = sum(wi * p for wi, (p, _) in zip(w, pools, strict=True))
    keys = sum(wi * k for wi, (_, k) in zip(w, pools, strict=True))
    return prompts, keys


def sikf(
    pools: list[tuple[torch.Tensor, torch.Tensor]],
    weights: list[float],
    backbone,
    x_surrogate: torch.Tensor,
    top_n: int,
    steps: int = 5,
    lr: float = 1e-3,
    target: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Selective Input Knowledge Fusion.

    Parameters
    ----------
    pools : list of (prompts (M, L, D), keys (M, D))
        The uploaded prompt pools.
    weights : list of float
        Per-pool weights (``num-examples``) for the key average.
    backbone : flowerbed.common.models.TinyViT
        The frozen backbone (``embed`` / ``features``).
    x_surrogate : torch.Tensor
        The server's surrogate images.
    top_n : int
        Prompts selected per input (N).
    steps : int, default 5
        Adam steps on the target pool's prompts.
    lr : float, default 1e-3
        Adam learning rate.
    target : int, default 0
        Index of the pool that is distilled (the paper draws it at random).

    Returns
    -------
    (prompts, keys, loss)
        The global pool and the last distillation loss
        ``1/(n-1) sum_{j != i} MSE(V(E'_i), V(E'_j))`` (before the last step; 0 for one pool).

    Notes
    -----
    Each teacher ``V(E'_j)`` selects prompts from pool ``j`` with pool ``j``'s own keys; the
    student selects from the distilled prompts with the averaged keys (the global keys).
    """
    _, keys = average_pools(pools, weights)
    if len(pools) == 1 or steps == 0:
        return pools[target][0].clone(), keys, 0.0
    with torch.no_grad():
        e = backbone.embed(x_surrogate)
        q = backbone.features(e)
        teachers = [
            prompted_features(backbone, e, q, p, k, top_n)[0]
            for j, (p, k) in enumerate(pools)
            if j != target
        ]
    prompts = pools[target][0].clone().requires_grad_(True)
    opt = torch.optim.Adam([prompts], lr=lr)
    loss_value = 0.0
    for _ in range(steps):
        out, _ = prompted_features(backbone, e, q, prompts, keys, top_n)
        loss = sum(F.mse_loss(out, t) for t in teachers) / len(teachers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()
    return prompts.detach(), keys, loss_value


# ---------------------------------------------------------------------------- KR (Eqs. 11-12)
def kr_t(acc_first_after_first: dict[int, float], acc_first_now: dict[int, float]) -> float:
    """Eq. 11: mean over clients of Acc(theta_i^r; T_i^0) / Acc(theta_i^0; T_i^0).

    Clients whose first-task accuracy was 0 (undefined ratio) are left out; NaN if none is left.
    """
    ratios = [
        acc_first_now[i] / a0
        for i, a0 in acc_first_after_first.items()
        if i in acc_first_now and a0 > 0
    ]
    return float(np.mean(ratios)) if ratios else float("nan")


def kr_s(acc_global: dict[int, float], acc_local: dict[int, float]) -> float:
    """Eq. 12: mean over clients of Acc(theta_g^r; T_i^r) / Acc(theta_i^r; T_i^r)."""
    ratios = [acc_global[i] / a for i, a in acc_local.items() if i in acc_global and a > 0]
    return float(np.mean(ratios)) if ratios else float("nan")


# ---------------------------------------------------------------------------- schedule
class ScheduleError(ValueError):
    """A continual-learning schedule that cannot be run (no task, no round per task)."""


class ContinualSchedule:
    """The federated continual-learning schedule, mixed into a FedAvg-based strategy.

    Round ``r`` (1-based) trains task ``(r - 1) // rounds_per_task``, round-in-task
    ``(r - 1) % rounds_per_task``. The train config of each round gets ``task``,
    ``round-in-task`` and ``bgps-freeze`` (``round-in-task >= bgps_warmup`` and
    ``server_round >= bgps_start_round``). Federated
    evaluation runs on the last round of each task only (:meth:`configure_evaluate` returns no
    message otherwise) with ``task`` and ``seen-classes`` (every class a valid training reply
    listed in its ``info`` ConfigRecord so far). Evaluation replies carry a ``pid`` metric (the
    client's partition id); the per-client metrics of each task are kept in
    :attr:`evaluations` and give :meth:`final_metrics`.

    Parameters
    ----------
    num_tasks : int, default 1
        Tasks of the stream.
    rounds_per_task : int, default 1
        Federated rounds per task.
    bgps_warmup : int, default 0
        Rounds of each task before BGPS may freeze a prototype.
    bgps_start_round : int, default 1
        First server round (1-based, of the whole run) in which BGPS may freeze a prototype
        (the run-level warm-up; 1 = none).
    **kwargs
        Passed to the next class of the MRO (:class:`flowerbed.strategies.fedavg.FedAvg`).

    Raises
    ------
    ScheduleError
        If ``num_tasks`` or ``rounds_per_task`` is below 1, ``bgps_warmup`` is negative or
        ``bgps_start_round`` is below 1.
    """

    def __init__(
        self,
        num_tasks: int = 1,
        rounds_per_task: int = 1,
        bgps_warmup: int = 0,
        bgps_start_round: int = 1,
        **kwargs,
    ) -> None:
        if num_tasks < 1 or rounds_per_task < 1:
            raise ScheduleError(
                f"num_tasks={num_tasks!r} and rounds_per_task={rounds_per_task!r} must be >= 1"
            )
        if bgps_warmup < 0:
            raise ScheduleError(f"bgps_warmup={bgps_warmup!r} must be >= 0")
        if bgps_start_round < 1:
            raise ScheduleError(f"bgps_start_round={bgps_start_round!r} must be >= 1")
        super().__init__(**kwargs)
        self.num_tasks = num_tasks
        self.rounds_per_task = rounds_per_task
        self.bgps_warmup = bgps_warmup
        self.bgps_start_round = bgps_start_round
        self.seen: set[int] = set()
        self.evaluations: dict[int, dict[int, dict]] = {}
        self.uploads: list[int] = []
        self.upload_values = 0

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(
            INFO,
            "\t└──> Continual schedule: %d tasks x %d rounds (BGPS may freeze from round %d "
            "of each task and from server round %d)",
            self.num_tasks,
            self.rounds_per_task,
            self.bgps_warmup,
            self.bgps_start_round,
        )

    # ------------------------------------------------------------------ schedule
    def position(self, server_round: int) -> tuple[int, int]:
        """``(task, round-in-task)`` of ``server_round`` (1-based rounds, 0-based tasks)."""
        return divmod(server_round - 1, self.rounds_per_task)

    def may_freeze(self, server_round: int) -> bool:
        """Whether BGPS may freeze prototypes in ``server_round``: after the warm-up of the task
        and of the run."""
        return (
            self.position(server_round)[1] >= self.bgps_warmup
            and server_round >= self.bgps_start_round
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's task, round-in-task and ``bgps-freeze`` in ``config``, then FedAvg's."""
        task, rit = self.position(server_round)
        config["task"] = task
        config["round-in-task"] = rit
        config["bgps-freeze"] = self.may_freeze(server_round)
        self._round(server_round).update({"task": task, "round_in_task": rit})
        return super().configure_train(server_round, arrays, config, grid)

    def filter_replies(
        self, server_round: int, replies: Iterable[Message], is_train: bool
    ) -> list[Message]:
        """FedAvg's checks; valid training replies add their classes to :attr:`seen` and their
        size (:func:`~flowerbed.common.records.wire_nbytes`, values) to the upload record."""
        good = super().filter_replies(server_round, replies, is_train)
        if is_train:
            for m in good:
                if "info" in m.content.config_records:
                    self.seen.update(int(c) for c in m.content["info"]["classes"])
                self.uploads.append(wire_nbytes(m.content))
                values = sum(
                    int(np.prod(a.shape))
                    for rec in m.content.array_records.values()
                    for a in rec.values()
                )
                self.upload_values = max(self.upload_values, values)
        return good

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation messages on the last round of a task (``task``, ``seen-classes``), else
        none."""
        task, rit = self.position(server_round)
        if rit != self.rounds_per_task - 1:
            return []
        config["task"] = task
        config["seen-classes"] = sorted(self.seen)
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Keep each client's metrics for the task; the mean accuracy over clients."""
        good = self.filter_replies(server_round, replies, is_train=False)
        if not good:
            return None
        task = self.position(server_round)[0]
        per: dict[int, dict] = {}
        for m in good:
            metrics = dict(m.content["metrics"])
            per[int(metrics.pop("pid"))] = metrics
        self.evaluations[task] = per
        acc = float(np.mean([m["acc"] for m in per.values()]))
        self._round(server_round).update(
            {"eval_task": task, "acc": acc, "per_client": {str(i): m for i, m in per.items()}}
        )
        return MetricRecord({"acc": acc, "task": task})

    def final_metrics(self) -> dict[str, float]:
        """``acc_t<k>`` (mean over clients after task k), ``kr_t``, ``kr_s``, ``accuracy`` (after
        the last evaluated task) and the mean upload per client and round (bytes, values)."""
        final: dict[str, float] = {}
        tasks = sorted(self.evaluations)
        for t in tasks:
            final[f"acc_t{t + 1}"] = float(
                np.mean([m["acc"] for m in self.evaluations[t].values()])
            )
        if tasks:
            first, last = self.evaluations[tasks[0]], self.evaluations[tasks[-1]]
            final["kr_t"] = kr_t(
                {i: m["acc_first"] for i, m in first.items()},
                {i: m["acc_first"] for i, m in last.items()},
            )
            final["kr_s"] = kr_s(
                {i: m["acc_cur_global"] for i, m in last.items()},
                {i: m["acc_cur_local"] for i, m in last.items() if "acc_cur_local" in m},
            )
            final["accuracy"] = final[f"acc_t{tasks[-1] + 1}"]
        final["upload_bytes_per_client_round"] = (
            float(np.mean(self.uploads)) if self.uploads else 0.0
        )
        final["upload_values_per_client_round"] = float(self.upload_values)
        return final


class ContinualFedAvg(ContinualSchedule, FedAvg):
    """flowerbed's guarded FedAvg on the continual schedule (the l2p / fedvit / fedavg baselines).

    Parameters
    ----------
    **kwargs
        Passed to :class:`ContinualSchedule` and :class:`flowerbed.strategies.fedavg.FedAvg`.
    """


# ---------------------------------------------------------------------------- strategy
class FedTA(ContinualSchedule, FedAvg):
    """FedTA server strategy (SIKF + BGPS) on the continual schedule and flowerbed's FedAvg.

    Parameters
    ----------
    backbone : flowerbed.common.models.TinyViT
        Frozen pre-trained backbone used by SIKF.
    x_surrogate : torch.Tensor
        Surrogate images for SIKF (disjoint from clients' data and the test split).
    num_classes : int
        Number of classes; prototype class ids must be in ``[0, num_classes)``.
    top_n : int, default 3
        Prompts selected per input (N), as on the clients.
    use_sikf : bool, default True
        SIKF (True) or a weighted average of the prompt pools (False, "w/o SIKF").
    sikf_steps : int, default 5
        Adam steps of SIKF per round.
    sikf_lr : float, default 1e-3
        Adam learning rate of SIKF.
    use_bgps : bool, default True
        BGPS (True) or the per-class mean of the uploaded prototypes (False, "w/o BGPS").
    bgps_thr : float, default 0.5
        BGPS freezing threshold ``Thr`` (Eq. 10).
    seed : int, default 0
        Seed of the random choice of the SIKF target pool (per round).
    **kwargs
        Passed to :class:`ContinualSchedule` (``num_tasks``, ``rounds_per_task``,
        ``bgps_warmup``) and :class:`flowerbed.strategies.fedavg.FedAvg` (``fraction_train``,
        ``min_train_nodes``, ``max_update_norm``, ``min_train_replies``, ...).
    """

    def __init__(
        self,
        backbone,
        x_surrogate: torch.Tensor,
        num_classes: int,
        top_n: int = 3,
        use_sikf: bool = True,
        sikf_steps: int = 5,
        sikf_lr: float = 1e-3,
        use_bgps: bool = True,
        bgps_thr: float = 0.5,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        self.x_surrogate = x_surrogate
        self.num_classes = num_classes
        self.top_n = top_n
        self.use_sikf = use_sikf
        self.sikf_steps = sikf_steps
        self.sikf_lr = sikf_lr
        self.use_bgps = use_bgps
        self.bgps_thr = bgps_thr
        self.seed = seed
        self.global_protos: dict[int, np.ndarray] = {}
        self.frozen: set[int] = set()

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(INFO, "\t└──> FedTA:")
        log(
            INFO, "\t\t├── SIKF: %s (steps %d, lr %g)", self.use_sikf, self.sikf_steps, self.sikf_lr
        )
        log(INFO, "\t\t├── BGPS: %s (thr %g)", self.use_bgps, self.bgps_thr)
        log(INFO, "\t\t└── surrogate samples: %d", len(self.x_surrogate))

    # ------------------------------------------------------------------ messages
    def protos_record(self) -> ArrayRecord:
        """The global prototypes as an ArrayRecord (``g.<class>``)."""
        return ArrayRecord(
            {
                f"g.{c}": Array(np.ascontiguousarray(v))
                for c, v in sorted(self.global_protos.items())
            }
        )

    def message_record(self, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        """Train/evaluate content: the global pool, the global prototypes and ``config``."""
        config["frozen-classes"] = sorted(self.frozen)
        return RecordDict({"arrays": arrays, "protos": self.protos_record(), "config": config})

    # ------------------------------------------------------------------ checks
    def check_reply(self, msg: Message, is_train: bool) -> str | None:
        """Metrics as in FedAvg; for training, a pool like the global one and valid prototypes."""
        content = msg.content
        if not is_train:
            return super().check_reply(msg, is_train=False)
        if "arrays" not in content.array_records or "protos" not in content.array_records:
            return "a FedTA reply needs the ArrayRecords 'arrays' and 'protos'"
        # FedAvg's checks expect a single ArrayRecord: check metrics and pool separately
        metrics_only = RecordDict(
            {k: v for k, v in content.metric_records.items()} | {"arrays": content["arrays"]}
        )
        why = super().check_reply(SimpleNamespace(content=metrics_only), True)
        if why is not None:
            return why
        dim = self._global["keys"].shape[-1] if self._global is not None else None
        for key, arr in content["protos"].items():
            m = PROTO_KEY.match(key)
            if m is None:
                return f"prototype key {key!r} is not p.<class> or k.<class>"
            if not 0 <= int(m.group(2)) < self.num_classes:
                return f"prototype class {m.group(2)} outside [0, {self.num_classes})"
            if dim is not None and tuple(arr.shape) != (dim,):
                return f"prototype {key!r} has shape {tuple(arr.shape)}, expected ({dim},)"
        return check_arrays(content["protos"], None)

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """SIKF (or averaging) of the pools and BGPS (or mean) of the prototypes."""
        good = self.filter_replies(server_round, replies, is_train=True)
        if len(good) < max(self.min_train_replies, 1):
            log(WARNING, "round %d: %d valid replies; global state kept", server_round, len(good))
            return None, None
        contents = [m.content for m in good]
        weights = [float(c["metrics"][self.weighted_by_key]) for c in contents]
        pools = [
            (
                torch.from_numpy(c["arrays"]["prompts"].numpy().copy()),
                torch.from_numpy(c["arrays"]["keys"].numpy().copy()),
            )
            for c in contents
        ]
        extra: dict[str, float] = {}
        if self.use_sikf:
            rng = np.random.default_rng(derive_seed(self.seed, server_round, 0x51CF))
            target = int(rng.integers(len(pools)))
            prompts, keys, loss = sikf(
                pools,
                weights,
                self.backbone,
                self.x_surrogate,
                self.top_n,
                self.sikf_steps,
                self.sikf_lr,
                target,
            )
            extra["sikf_loss"] = loss
            extra["sikf_target_node"] = good[target].metadata.src_node_id
        else:
            prompts, keys = average_pools(pools, weights)
        local = [
            (int(PROTO_KEY.match(k).group(2)), a.numpy())
            for c in contents
            for k, a in c["protos"].items()
            if k.startswith("p.")
        ]
        if self.use_bgps:
            self.global_protos, self.frozen, scores = bgps(
                local,
                self.global_protos,
                self.frozen,
                self.bgps_thr,
                self.may_freeze(server_round),
            )
            if scores:
                extra["bgps_mean_score"] = float(np.mean(list(scores.values())))
        else:
            self.global_protos = mean_prototypes(local, self.global_protos)
        extra["num_global_protos"] = len(self.global_protos)
        extra["num_frozen"] = len(self.frozen)
        self._round(server_round).update(extra)
        metrics = self.train_metrics_aggr_fn(
            [RecordDict({"metrics": c["metrics"]}) for c in contents], self.weighted_by_key
        )
        for k, v in extra.items():
            metrics[k] = v
        pool = ArrayRecord({"prompts": prompts.contiguous(), "keys": keys.contiguous()})
        return pool, metrics
