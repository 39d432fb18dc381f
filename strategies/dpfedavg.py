"""FedAvg with central differential privacy (server-side fixed clipping) and an RDP accountant.

McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (arXiv:1710.06963), the DP-FedAvg with fixed-size denominator; Gaussian mechanism
accounting with Renyi DP (Mironov, "Renyi Differential Privacy", CSF 2017, arXiv:1702.07476) and
its subsampled version (Mironov, Talwar, Zhang 2019, arXiv:1908.10530).

Built on Flower's :class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`
(its Gaussian noise ``_add_noise_to_aggregated_arrays`` is used as it is; the flat clipping is
Flower's ``clip_inputs_inplace`` rule, re-done here in float64 and guarded against a zero update,
which makes Flower's version divide by zero). Flower 1.41's own ``RdpAccountant`` needs the ``dp-accounting`` package
(not installed here) and refuses a wrapped strategy that overrides ``aggregate_train``, so the
epsilon is computed with Opacus' RDP accountant instead; this is the same RDP bound for the
(subsampled) Gaussian mechanism.

Differences from Flower's wrapper, so that the privacy claim holds in a run with faults:

- replies are first checked by the inner flowerbed :class:`~flowerbed.strategies.fedavg.FedAvg`
  (shapes, dtypes, NaN/Inf, norm); a bad or failed reply is left out instead of stopping the
  aggregation, so one broken client does not skip the round;
- every update ``delta_i = w_i - w`` is clipped to L2 norm ``clipping_norm`` and the new model is
  ``w + (sum_i clip(delta_i)) / m + N(0, (z C / m)^2)`` with ``m = num_sampled_clients`` fixed
  (unweighted, fixed denominator), so one client changes the sum by at most ``C`` whatever the
  number of replies; the noise std is Flower's ``compute_stdv(z, C, m)``;
- after each noisy release the accountant steps once with sampling rate
  ``q = num_sampled_clients / population_size`` and ``dp_epsilon`` (at ``delta``) is written into
  the round's row of ``history`` (so it is in ``results.json``). With ``q = 1`` there is no
  amplification. Opacus' subsampled RDP assumes Poisson sampling; flowerbed samples a fixed
  number of clients, so for ``q < 1`` the epsilon is the usual approximation.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from flowerbed.strategies.fedavg import FedAvg


class DPFedAvg(DifferentialPrivacyServerSideFixedClipping):
    """Central DP FedAvg: server-side clipping, Gaussian noise, RDP epsilon per round.

    Parameters
    ----------
    strategy : FedAvg or None, default None
        The flowerbed FedAvg whose checks, sampling and bookkeeping are used (None: ``FedAvg()``
        with one node minimum).
    noise_multiplier : float, default 1.0
        Noise multiplier ``z`` of the Gaussian mechanism (> 0).
    clipping_norm : float, default 1.0
        L2 bound ``C`` on each client's update.
    num_sampled_clients : int, default 2
        Clients sampled per round ``m`` (the fixed denominator).
    population_size : int or None, default None
        Number of clients the sample is drawn from (None: ``num_sampled_clients``, i.e. q = 1).
    delta : float, default 1e-5
        Target delta of the reported epsilon.
    """

    def __init__(
        self,
        strategy: FedAvg | None = None,
        noise_multiplier: float = 1.0,
        clipping_norm: float = 1.0,
        num_sampled_clients: int = 2,
        population_size: int | None = None,
        delta: float = 1e-5,
    ) -> None:
        from opacus.accountants import RDPAccountant

        if strategy is None:
            strategy = FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier={noise_multiplier}: must be > 0")
        if not 0 < delta < 1:
            raise ValueError(f"delta={delta}: must be in (0, 1)")
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.population_size = population_size or num_sampled_clients
        if self.population_size < num_sampled_clients:
            raise ValueError(
                f"population_size={self.population_size} < num_sampled_clients="
                f"{num_sampled_clients}"
            )
        self.sample_rate = num_sampled_clients / self.population_size
        self.delta = delta
        self.accountant = None  # Flower's accountant slot stays unused (see module docstring)
        self.rdp = RDPAccountant()

    @property
    def history(self) -> dict:
        return self.strategy.history

    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta` (0 before the first release)."""
        if not self.rdp.history:
            return 0.0
        return float(self.rdp.get_epsilon(self.delta))

    def summary(self) -> None:
        log(INFO, "\t├──> RDP accounting: q=%.4g, delta=%g", self.sample_rate, self.delta)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Checked replies -> clipped, summed, divided by m, noised; accountant steps once."""
        inner: FedAvg = self.strategy
        good = inner.filter_replies(server_round, replies, is_train=True)
        row = inner._round(server_round)
        if len(good) < max(inner.min_train_replies, 1):
            log(INFO, "round %d: too few valid replies for a DP release; model kept", server_round)
            row["dp_epsilon"] = self.epsilon()
            return None, None
        current = self.current_arrays.to_numpy_ndarrays()
        total = [np.zeros_like(c, dtype=np.float64) for c in current]
        for msg in good:
            record = next(iter(msg.content.array_records.values()))
            nd = record.to_numpy_ndarrays()
            delta = [a.astype(np.float64) - c for a, c in zip(nd, current, strict=True)]
            norm = float(np.sqrt(sum(np.sum(d * d) for d in delta)))
            # Flower's clip_inputs_inplace (FlatClip), guarded against a zero update
            scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            for t, d in zip(total, delta, strict=True):
                t += d * scale
        m = self.num_sampled_clients
        mean = ArrayRecord(
            {
                k: Array((c + t / m).astype(c.dtype))
                for k, c, t in zip(self.current_arrays.keys(), current, total, strict=True)
            }
        )
        noisy = self._add_noise_to_aggregated_arrays(mean)
        self.rdp.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        eps = self.epsilon()
        row["dp_epsilon"] = eps
        log(INFO, "round %d: DP release, epsilon=%.4f at delta=%g", server_round, eps, self.delta)
        metrics = inner.train_metrics_aggr_fn([m_.content for m_ in good], inner.weighted_by_key)
        return noisy, metrics

    def state_dict(self) -> dict:
        return {"rdp_history": [list(h) for h in self.rdp.history]}

    def load_state_dict(self, state: dict) -> None:
        self.rdp.history = [tuple(h) for h in state.get("rdp_history", [])]
