"""FedIDM: Byzantine-robust aggregation checked against condensed data (Reconstruction).

Yang, Lv, Xi, Ma, Gu and Zhao, "FedIDM: Achieving Fast and Stable Convergence in Byzantine
Federated Learning through Iterative Distribution Matching", arXiv:2604.15115 (2026). Only the
abstract is available (``../shared/papers/fedidm.md``); the mechanism is from the paper, every
formula and threshold below is a **Reconstruction** on top of FedDM-style distribution matching
(Xiong et al., CVPR 2023):

1. each client uploads, with its model, a small synthetic set ``S_k`` (IPC images per class)
   condensed from its data by distribution matching (the app's client step);
2. the server pools the sets of the clients it trusted in the previous round (all in round 1),
   and rectifies their labels (``rectify``): ``"client"`` drops the set of a client whose
   labels the global model agrees with less than ``rectify_min_agree`` times the median
   agreement of the pooled clients (a label-flipped set); ``"sample"`` (once the model agrees
   with at least ``rectify_min_agree`` of the pooled labels) drops every sample whose label the
   model does not predict; ``"none"``;
3. the reference update ``g_0``: the global model trained a few steps on the pooled set ``S*``;
4. a client update ``Delta_k`` is rejected if ``cos(Delta_k, g_0) < tau_cos`` (it deviates from
   the condensed-data direction) or if its loss rise on ``S*``, ``L(w + Delta_k) - L(w)``,
   exceeds ``max(0, median + mad_c * MAD)`` over the round's clients (negative contribution);
5. the accepted updates are averaged (plain mean; optionally each clipped to ``||g_0||``); if
   every update is rejected, the fallback is ``w + g_0`` (``fallback="condensed"``) or the
   model is kept (``"keep"``); the accepted clients are the trusted ones of the next round;
6. optionally (``finetune``) the server then trains the aggregate on ``S*`` with the same
   ``train_fn`` as ``g_0`` (FedDM's server step on condensed data; Reconstruction option of
   "fast and stable convergence", see the app README's "Diagnosis"), from round
   ``finetune_from`` on (2: never on the round-1 pool, which holds every client's set
   unrectified, the global model being at chance; Reconstruction option).

The rejected nodes and the reason of each are in the round's history row (``rejected_nodes``,
``reject_reasons``), which the attack wrapper scores for detection precision and recall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log

from flowerbed.common.attacks import flatten, unflatten
from flowerbed.strategies.fedavg import FedAvg

SYNTHETIC = "synthetic"
FALLBACKS = ("condensed", "keep")
RECTIFY = ("client", "sample", "none")


class FedIDMError(ValueError):
    """A FedIDM setting out of range (unknown fallback or rectification)."""


def rejection(
    cosines: np.ndarray, rises: np.ndarray, tau_cos: float = 0.0, mad_c: float = 5.0
) -> tuple[list[str | None], float]:
    """Per client, why it is rejected (or None), and the loss threshold used.

    ``direction`` if ``cos < tau_cos``; else ``loss`` if ``rise > max(0, median + mad_c * MAD)``
    with ``MAD = median(|rise - median(rise)|)``.
    """
    med = float(np.median(rises))
    tau_loss = max(0.0, med + mad_c * float(np.median(np.abs(rises - med))))
    reasons: list[str | None] = []
    for c, r in zip(cosines, rises, strict=True):
        if c < tau_cos:
            reasons.append(f"direction: cos {c:.3f} < {tau_cos}")
        elif r > tau_loss:
            reasons.append(f"loss: rise {r:.4f} > {tau_loss:.4f}")
        else:
            reasons.append(None)
    return reasons, tau_loss


def cosines(updates: np.ndarray, g0: np.ndarray) -> np.ndarray:
    """``cos(Delta_k, g_0)`` per row (0 for a zero vector)."""
    den = np.linalg.norm(updates, axis=1) * np.linalg.norm(g0)
    return (updates @ g0) / np.maximum(den, 1e-12)


class FedIDM(FedAvg):
    """FedIDM's robust aggregation (Reconstruction, see the module docstring).

    Parameters
    ----------
    train_fn : callable
        ``train_fn(server_round, arrays, x, y) -> ArrayRecord``: a few SGD steps of the model on
        the condensed set (gives ``g_0``).
    loss_fn : callable
        ``loss_fn(arrays, x, y) -> float``: mean loss on the condensed set.
    predict_fn : callable
        ``predict_fn(arrays, x) -> ndarray of labels`` (label rectification).
    num_classes : int
        Labels of the synthetic sets are in ``[0, num_classes)``.
    tau_cos : float, default 0.0
        Direction threshold.
    mad_c : float, default 5.0
        Loss threshold ``max(0, median + mad_c * MAD)`` (2.0 rejected benign non-IID clients:
        the app README's "Diagnosis").
    clip : bool, default False
        Clip each accepted update to ``||g_0||``.
    fallback : str, default "condensed"
        All rejected: ``"condensed"`` (``w + g_0``) or ``"keep"``.
    rectify : str, default "client"
        Label rectification of the pool: ``"client"``, ``"sample"`` or ``"none"`` (module
        docstring, step 2).
    rectify_min_agree : float, default 0.5
    trusted_only : bool, default True
        Pool only the synthetic sets of the clients accepted in the previous round.
    finetune : bool, default False
        Train the aggregate on the condensed set with ``train_fn`` (not after the fallback,
        which is already ``w + g_0``).
    finetune_from : int, default 1
        First round of ``finetune`` (2: the round-1 pool, unrectifiable at a chance-level
        model, is never trained on; it still gives the round's ``g_0`` and checks).
    **kwargs
        Passed to :class:`flowerbed.strategies.fedavg.FedAvg`.
    """

    extra_arrayrecords = (SYNTHETIC,)

    def __init__(
        self,
        train_fn: Callable[[int, ArrayRecord, np.ndarray, np.ndarray], ArrayRecord],
        loss_fn: Callable[[ArrayRecord, np.ndarray, np.ndarray], float],
        predict_fn: Callable[[ArrayRecord, np.ndarray], np.ndarray],
        num_classes: int,
        tau_cos: float = 0.0,
        mad_c: float = 5.0,
        clip: bool = False,
        fallback: str = "condensed",
        rectify: str = "client",
        rectify_min_agree: float = 0.5,
        trusted_only: bool = True,
        finetune: bool = False,
        finetune_from: int = 1,
        **kwargs,
    ) -> None:
        if fallback not in FALLBACKS:
            raise FedIDMError(f"fallback={fallback!r}: must be one of {', '.join(FALLBACKS)}")
        if rectify not in RECTIFY:
            raise FedIDMError(f"rectify={rectify!r}: must be one of {', '.join(RECTIFY)}")
        super().__init__(**kwargs)
        self.train_fn, self.loss_fn, self.predict_fn = train_fn, loss_fn, predict_fn
        self.num_classes = num_classes
        self.tau_cos, self.mad_c, self.clip, self.fallback = tau_cos, mad_c, clip, fallback
        self.rectify, self.rectify_min_agree = rectify, rectify_min_agree
        self.trusted_only = trusted_only
        self.finetune, self.finetune_from = finetune, finetune_from
        self.trusted: set[int] | None = None

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> FedIDM (Reconstruction): condensed-data checks")
        log(INFO, "\t│\t├── tau_cos=%s mad_c=%s clip=%s", self.tau_cos, self.mad_c, self.clip)
        log(
            INFO,
            "\t│\t└── fallback=%s rectify=%s finetune=%s (from round %s)",
            self.fallback,
            self.rectify,
            self.finetune,
            self.finetune_from,
        )
        super().summary()

    def check_reply(self, msg: Message, is_train: bool) -> str | None:
        """FedAvg's checks, plus a well-formed synthetic set on train replies."""
        why = super().check_reply(msg, is_train)
        if why is not None or not is_train:
            return why
        if SYNTHETIC not in msg.content.array_records:
            return "no synthetic set"
        syn = msg.content[SYNTHETIC]
        if set(syn.keys()) != {"x", "y"}:
            return f"synthetic set keys {sorted(syn.keys())} != ['x', 'y']"
        x, y = syn["x"].numpy(), syn["y"].numpy()
        if len(x) == 0 or len(x) != len(y) or y.ndim != 1:
            return f"synthetic set shapes x{x.shape} y{y.shape}"
        if not np.all(np.isfinite(x)):
            return "synthetic set not finite"
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= self.num_classes:
            return f"synthetic labels outside [0, {self.num_classes})"
        return None

    def condensed_set(self, server_round: int, good: list[Message]) -> tuple[np.ndarray, ...]:
        """The pooled synthetic sets of the trusted clients, rectified."""
        trusted = self.trusted if self.trusted_only else None
        pool = [m for m in good if trusted is None or m.metadata.src_node_id in trusted] or good
        sets = [
            (m.content[SYNTHETIC]["x"].numpy(), m.content[SYNTHETIC]["y"].numpy().astype(np.int64))
            for m in pool
        ]
        row = self._round(server_round)
        row["condensed_pool"] = sum(len(sy) for _, sy in sets)
        row["rectified"] = False
        if self.rectify == "client":
            agree = np.array([np.mean(self.predict_fn(self._global, sx) == sy) for sx, sy in sets])
            keep = agree >= self.rectify_min_agree * np.median(agree)
            row["label_agreement"] = float(np.median(agree))
            row["rectify_dropped"] = [
                m.metadata.src_node_id for m, k in zip(pool, keep, strict=True) if not k
            ]
            if keep.any() and not keep.all():
                sets = [st for st, k in zip(sets, keep, strict=True) if k]
                row["rectified"] = True
        x = np.concatenate([sx for sx, _ in sets])
        y = np.concatenate([sy for _, sy in sets])
        if self.rectify == "sample":
            agree = np.asarray(self.predict_fn(self._global, x)) == y
            row["label_agreement"] = float(agree.mean())
            if agree.mean() >= self.rectify_min_agree and agree.any():
                x, y = x[agree], y[agree]
                row["rectified"] = True
        row["condensed_size"] = len(y)
        return x, y

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reject by direction and loss rise on the condensed set; mean of the rest."""
        valid = self.valid_updates(server_round, replies)
        if valid is None:
            return None, None
        good, keys, w, updates = valid
        x, y = self.condensed_set(server_round, good)
        g0 = flatten(self.train_fn(server_round, self._global, x, y), keys) - w
        loss0 = self.loss_fn(self._global, x, y)
        rises = np.array(
            [self.loss_fn(unflatten(w + u, self._global, keys), x, y) - loss0 for u in updates]
        )
        cos = cosines(updates, g0)
        reasons, tau_loss = rejection(cos, rises, self.tau_cos, self.mad_c)
        nodes = [m.metadata.src_node_id for m in good]
        accepted = [i for i, r in enumerate(reasons) if r is None]
        row = self._round(server_round)
        row.update(
            {
                "rejected_nodes": sorted(n for n, r in zip(nodes, reasons, strict=True) if r),
                "reject_reasons": {str(n): r for n, r in zip(nodes, reasons, strict=True) if r},
                "num_accepted": len(accepted),
                "tau_loss": tau_loss,
                "g0_norm": float(np.linalg.norm(g0)),
                "fallback_used": not accepted,
                "cos": {str(n): float(c) for n, c in zip(nodes, cos, strict=True)},
                "rise": {str(n): float(r) for n, r in zip(nodes, rises, strict=True)},
            }
        )
        metrics = self.train_metrics_aggr_fn([m.content for m in good], self.weighted_by_key)
        if not accepted:
            log(
                WARNING, "round %d: every update rejected; fallback %s", server_round, self.fallback
            )
            if self.fallback == "keep":
                return None, metrics
            return unflatten(w + g0, self._global, keys), metrics
        self.trusted = {nodes[i] for i in accepted}
        chosen = updates[accepted]
        if self.clip:
            n0 = np.linalg.norm(g0)
            norms = np.linalg.norm(chosen, axis=1)
            chosen = chosen * np.minimum(1.0, n0 / np.maximum(norms, 1e-12))[:, None]
        new = unflatten(w + chosen.mean(0), self._global, keys)
        row["finetuned"] = self.finetune and server_round >= self.finetune_from
        if row["finetuned"]:
            new = self.train_fn(server_round, new, x, y)
        return new, metrics
