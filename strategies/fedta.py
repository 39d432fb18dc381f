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

The task/round schedule of federated continual learning is driven by the ServerApp
(``apps/fedta``) with :meth:`FedTA.configure_train` / :meth:`FedTA.aggregate_train`; the train
config carries the task index and ``bgps-freeze`` (whether BGPS may freeze in this round).
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
from flowerbed.common.records import check_arrays
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


# ---------------------------------------------------------------------------- strategy
class FedTA(FedAvg):
    """FedTA server strategy (SIKF + BGPS) on top of flowerbed's guarded FedAvg.

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
        Passed to :class:`flowerbed.strategies.fedavg.FedAvg` (``fraction_train``,
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
        self._freeze_ok = True

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

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global pool, the global prototypes and ``config`` to the sampled nodes."""
        self._freeze_ok = bool(config.get("bgps-freeze", True))
        return super().configure_train(server_round, arrays, config, grid)

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
                local, self.global_protos, self.frozen, self.bgps_thr, self._freeze_ok
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
