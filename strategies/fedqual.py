"""FedQual: reliability-aware aggregation for federated label distribution learning.

Wu, Kou, Zeng, Huang, Liu, Gu, Jia, Jiang, Liu and Geng, "Trustworthy Federated Label
Distribution Learning under Annotation Quality Disparity", arXiv:2605.04827 (2026).

Only the paper's abstract was available. From it: clients are weighted by "effective reliable
information rather than raw sample size", and low-quality clients are calibrated towards a
"global semantic anchor". Everything concrete here is a RECONSTRUCTION:

- each training reply carries the client's estimated annotation quality ``q_k`` in [0, 1]
  (metric ``quality``, computed by the client against the global model it received);
- the aggregation weight is ``w_k = n_k q_k^gamma / sum_j n_j q_j^gamma``
  (:func:`reliability_weights`), instead of FedAvg's ``n_k / sum_j n_j``;
- the server broadcasts ``q-ref`` (the largest ``q_k`` of the previous round, 0 in round 1) and
  ``alpha-max`` in the train config, from which each client sets its calibration weight
  ``alpha_k = alpha_max (1 - q_k / q_ref)`` clipped to [0, alpha_max] (done client-side);
- with ``uniform_alpha`` set (the *uniform calibration* baseline of the paper's theorem, a
  RECONSTRUCTION) the server also sends ``uniform-alpha`` and every client uses that same
  weight (from round 2 on, when ``q-ref`` > 0) instead of its own ``alpha_k``.

Per round, :attr:`FedQual.history` holds ``quality``, ``reliability_weight`` and ``alpha`` per
partition id (so the estimate is visible in ``results.json``).
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flowerbed.strategies.fedavg import FedAvg

QUALITY_KEY = "quality"
ALPHA_KEY = "alpha"
PARTITION_KEY = "partition-id"


def reliability_weights(num_examples, qualities, power: float = 1.0) -> np.ndarray:
    """Normalised weights ``n_k q_k^power / sum_j n_j q_j^power``.

    Parameters
    ----------
    num_examples : array-like of float
        Sample counts ``n_k`` (> 0).
    qualities : array-like of float
        Estimated qualities ``q_k`` in [0, 1].
    power : float, default 1.0
        Exponent ``gamma`` of the quality (0 gives FedAvg's weights).

    Returns
    -------
    np.ndarray
        Weights summing to one. If every ``n_k q_k^power`` is 0 the FedAvg weights are returned.
    """
    n = np.asarray(num_examples, dtype=np.float64)
    q = np.clip(np.asarray(qualities, dtype=np.float64), 0.0, 1.0)
    if n.shape != q.shape or n.ndim != 1 or len(n) == 0:
        raise ValueError(f"need equal-length 1-d inputs, got {n.shape} and {q.shape}")
    raw = n * q**power
    if raw.sum() <= 0:
        return n / n.sum()
    return raw / raw.sum()


class FedQual(FedAvg):
    """FedAvg with quality-weighted aggregation and a calibration reference for the clients.

    Parameters
    ----------
    reliability_power : float, default 1.0
        Exponent ``gamma`` in ``w_k ∝ n_k q_k^gamma``.
    use_reliability : bool, default True
        False: aggregate with FedAvg's ``n_k`` weights (ablation "no reliability weights");
        ``quality`` is still required and recorded.
    alpha_max : float, default 0.5
        Largest calibration weight, sent to the clients as ``alpha-max`` (0 disables the
        calibration: ablation "no calibration").
    uniform_alpha : float or None, default None
        If set, sent to the clients as ``uniform-alpha``: every client calibrates with this one
        weight instead of its quality-specific ``alpha_k`` (baseline "uniform calibration").
    quality_key : str, default "quality"
        Reply metric holding ``q_k``.
    **kwargs
        Passed to :class:`flowerbed.strategies.fedavg.FedAvg` (``fraction_train``,
        ``min_train_nodes``, ``max_update_norm``, ``sample_seed``, ...).
    """

    def __init__(
        self,
        reliability_power: float = 1.0,
        use_reliability: bool = True,
        alpha_max: float = 0.5,
        uniform_alpha: float | None = None,
        quality_key: str = QUALITY_KEY,
        **kwargs,
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", mean_train_metrics)
        super().__init__(**kwargs)
        if reliability_power < 0:
            raise ValueError(f"reliability_power={reliability_power!r} must be >= 0")
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"alpha_max={alpha_max!r} must be in [0, 1]")
        if uniform_alpha is not None and not 0.0 <= uniform_alpha <= 1.0:
            raise ValueError(f"uniform_alpha={uniform_alpha!r} must be in [0, 1]")
        self.reliability_power = reliability_power
        self.use_reliability = use_reliability
        self.alpha_max = alpha_max
        self.uniform_alpha = uniform_alpha
        self.quality_key = quality_key
        self.q_ref = 0.0

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(INFO, "\t└──> FedQual:")
        log(INFO, "\t\t├── reliability_power: %s", self.reliability_power)
        log(INFO, "\t\t├── use_reliability: %s", self.use_reliability)
        log(INFO, "\t\t├── alpha_max: %s", self.alpha_max)
        log(INFO, "\t\t└── uniform_alpha: %s", self.uniform_alpha)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ):
        """FedAvg's sampling; the config also carries ``q-ref`` and ``alpha-max`` (and
        ``uniform-alpha`` for the uniform-calibration baseline)."""
        config["q-ref"] = float(self.q_ref)
        config["alpha-max"] = float(self.alpha_max)
        if self.uniform_alpha is not None:
            config["uniform-alpha"] = float(self.uniform_alpha)
        return super().configure_train(server_round, arrays, config, grid)

    def check_reply(self, msg: Message, is_train: bool) -> str | None:
        """FedAvg's checks, plus a ``quality`` metric in [0, 1] on training replies."""
        why = super().check_reply(msg, is_train)
        if why is not None or not is_train:
            return why
        metrics = next(iter(msg.content.metric_records.values()))
        q = metrics.get(self.quality_key)
        if not isinstance(q, int | float) or not 0.0 <= q <= 1.0:
            return f"metric {self.quality_key!r}={q!r} is not a quality in [0, 1]"
        return None

    def aggregate_arrays(self, server_round: int, contents: list[RecordDict]) -> ArrayRecord:
        """Reliability-weighted mean of the replies' arrays; records the weights."""
        metrics = [next(iter(c.metric_records.values())) for c in contents]
        n = [float(m[self.weighted_by_key]) for m in metrics]
        q = [float(m[self.quality_key]) for m in metrics]
        power = self.reliability_power if self.use_reliability else 0.0
        w = reliability_weights(n, q, power)
        weighted = [
            RecordDict(
                {
                    "arrays": next(iter(c.array_records.values())),
                    "m": MetricRecord({"w": float(wi)}),
                }
            )
            for c, wi in zip(contents, w, strict=True)
        ]
        pids = [int(m.get(PARTITION_KEY, i)) for i, m in enumerate(metrics)]
        row = self._round(server_round)
        row["quality"] = {str(p): qi for p, qi in zip(pids, q, strict=True)}
        row["reliability_weight"] = {str(p): float(wi) for p, wi in zip(pids, w, strict=True)}
        row["alpha"] = {
            str(p): float(m.get(ALPHA_KEY, 0.0)) for p, m in zip(pids, metrics, strict=True)
        }
        row["q_ref"] = float(self.q_ref)
        self.q_ref = max(q)
        return aggregate_arrayrecords(weighted, "w")


def mean_train_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Sample-weighted mean of the training metrics, leaving out the partition id."""
    metrics = [next(iter(c.metric_records.values())) for c in contents]
    n = np.array([float(m[weight_key]) for m in metrics])
    keys = [k for k in metrics[0] if k not in (weight_key, PARTITION_KEY)]
    out = MetricRecord()
    for k in keys:
        vals = [m.get(k) for m in metrics]
        if all(isinstance(v, int | float) for v in vals):
            out[k] = float(np.dot(n, vals) / n.sum())
    return out
