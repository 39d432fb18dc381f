"""FLTrust: Byzantine-robust aggregation bootstrapped by a small clean server set.

Cao, Fang, Liu and Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021 (arXiv:2012.13995). Each round the server trains the global model
``w`` on its own small clean *root* set, which gives the server update ``g_0``. A client update
``g_i = w_i - w`` gets the trust score ``TS_i = ReLU(cos(g_i, g_0))``, is rescaled to the norm
of ``g_0`` and the global update is the trust-weighted mean::

    w <- w + sum_i TS_i * (||g_0|| / ||g_i||) * g_i / sum_j TS_j

(with every trust score 0, the model is kept). Flower has no FLTrust; this subclass of
flowerbed's FedAvg keeps its reply validation and failure accounting and replaces the averaging.
A client with trust 0 counts as rejected (``rejected_nodes`` in the round's history row), which
is what the attack wrapper scores for detection precision and recall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log

from flowerbed.common.attacks import flatten, unflatten
from flowerbed.strategies.fedavg import FedAvg
from flowerbed.strategies.fedidm import cosines


class FLTrustError(RuntimeError):
    """The server update is unusable (not finite, or zero: no direction to trust)."""


def trust_weights(updates: np.ndarray, g0: np.ndarray) -> np.ndarray:
    """``ReLU(cos(g_i, g_0))`` for the rows of ``updates`` (0 for a zero update)."""
    cos = cosines(updates, g0)
    return np.maximum(cos, 0.0) * (np.linalg.norm(updates, axis=1) > 0)


def fltrust_update(updates: np.ndarray, g0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The global update and the trust scores (``(zeros, scores)`` when every score is 0)."""
    ts = trust_weights(updates, g0)
    if ts.sum() <= 0:
        return np.zeros_like(g0), ts
    n0 = np.linalg.norm(g0)
    scaled = updates * (n0 / np.maximum(np.linalg.norm(updates, axis=1), 1e-12))[:, None]
    return (ts[:, None] * scaled).sum(0) / ts.sum(), ts


class FLTrust(FedAvg):
    """FLTrust (Cao et al., NDSS 2021) on flowerbed's FedAvg guards.

    Parameters
    ----------
    server_update : callable
        ``server_update(server_round, arrays) -> ArrayRecord``: the global model after the
        server's training on its clean root set (the app trains it; ``g_0`` is the difference).
    **kwargs
        Passed to :class:`flowerbed.strategies.fedavg.FedAvg` (sampling, validation...).
    """

    def __init__(self, server_update: Callable[[int, ArrayRecord], ArrayRecord], **kwargs) -> None:
        super().__init__(**kwargs)
        self.server_update = server_update

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> FLTrust: trust = ReLU(cos(g_i, g_0)), g_0 from the root set")
        super().summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Trust-weighted mean of the rescaled updates of the valid replies."""
        valid = self.valid_updates(server_round, replies)
        if valid is None:
            return None, None
        good, keys, w, updates = valid
        g0 = flatten(self.server_update(server_round, self._global), keys) - w
        if not np.all(np.isfinite(g0)) or not np.any(g0):
            raise FLTrustError(f"round {server_round}: the server update g_0 is zero or not finite")
        delta, ts = fltrust_update(updates, g0)
        nodes = [m.metadata.src_node_id for m in good]
        row = self._round(server_round)
        row["trust_scores"] = {str(n): round(float(t), 6) for n, t in zip(nodes, ts, strict=True)}
        row["rejected_nodes"] = sorted(n for n, t in zip(nodes, ts, strict=True) if t <= 0)
        row["server_update_norm"] = float(np.linalg.norm(g0))
        metrics = self.train_metrics_aggr_fn([m.content for m in good], self.weighted_by_key)
        if ts.sum() <= 0:
            log(INFO, "round %d: every trust score is 0; model kept", server_round)
            return None, metrics
        return unflatten(w + delta, self._global, keys), metrics
