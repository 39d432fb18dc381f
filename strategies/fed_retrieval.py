"""Server Adam for federated dual-encoder retrieval: Flower's FedAdam with flowerbed's guards.

Ning et al., "Learning Federated Representations and Recommendations with Limited Negatives",
NeurIPS 2021 FL workshop (arXiv:2108.07931). The authors' code trains the dual encoder with
FedAvg whose server applies Adam (learning rate 1.0) to the mean client delta (Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295). That server step is Flower's
own :class:`flwr.serverapp.strategy.FedAdam`; this module only puts flowerbed's
:class:`~flowerbed.strategies.fedavg.FedAvg` under it, so every reply is validated (keys,
shapes, dtypes, finite values, positive weight: a bad reply is left out with a named reason),
failures are counted, too few valid replies keep the model, and clients are sampled by
partition id with a seed.

Flower's FedAdam (1.42) differs from Keras' Adam in two places the README states: ``tau`` (the
epsilon) is added to ``sqrt(v)``, and the bias correction uses ``server_round + 1``. It also
returns float64 arrays (its bias-corrected rate is a numpy float64) for a float32 model, so the
next round's float32 replies would fail the dtype check: the step is cast back to the model's
dtypes here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import FedAdam as _FlowerFedAdam

from flowerbed.strategies.baselines import guard_kwargs
from flowerbed.strategies.fedavg import FedAvg


class ServerAdam(_FlowerFedAdam, FedAvg):
    """Flower's FedAdam (server Adam on the mean delta) over flowerbed's validated FedAvg.

    Parameters
    ----------
    eta : float, default 1.0
        Server learning rate (the authors': 1.0).
    beta_1 : float, default 0.9
        First-moment decay.
    beta_2 : float, default 0.999
        Second-moment decay (Keras' default, the authors' optimiser).
    tau : float, default 1e-3
        Added to ``sqrt(v)`` (Flower's default; Keras uses 1e-7).
    max_update_norm : float or None, default None
        Reject replies whose L2 distance to the global model exceeds this.
    min_train_replies : int, default 1
        Valid replies needed to update the model; with fewer it is kept.
    sample_seed : int or None, default None
        Sample clients by partition id with this seed (None: Flower's sampling).
    **kwargs
        Passed to Flower's FedAdam (``fraction_train``, ``fraction_evaluate``, ``min_*_nodes``).
    """

    def __init__(
        self,
        eta: float = 1.0,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        tau: float = 1e-3,
        max_update_norm: float | None = None,
        min_train_replies: int = 1,
        sample_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if eta <= 0 or tau <= 0 or not (0 <= beta_1 < 1 and 0 <= beta_2 < 1):
            raise ServerAdamError(
                f"need eta > 0, tau > 0, 0 <= beta < 1; got eta={eta}, tau={tau}, "
                f"beta_1={beta_1}, beta_2={beta_2}"
            )
        super().__init__(eta=eta, eta_l=1.0, beta_1=beta_1, beta_2=beta_2, tau=tau, **kwargs)
        # flowerbed FedAvg's guards (its __init__ ran through Flower's FedOpt with defaults)
        self.max_update_norm = max_update_norm
        self.min_train_replies = min_train_replies
        self.sample_seed = sample_seed

    def summary(self) -> None:
        """Log the configuration (Flower's FedAdam settings, then flowerbed FedAvg's)."""
        log(INFO, "\t├──> ServerAdam: Flower's FedAdam over flowerbed's validated FedAvg")
        super().summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's Adam step on flowerbed's validated mean, in the global model's dtypes."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        dtypes = {k: v.dtype for k, v in self.current_arrays.items()}
        cast = {k: np.asarray(a.numpy(), dtype=dtypes[k]) for k, a in arrays.items()}
        return ArrayRecord({k: Array(v) for k, v in cast.items()}), metrics


class ServerAdamError(ValueError):
    """A server-Adam setting out of range."""


def make_server_adam(
    cfg: Mapping[str, Any], strategy_kwargs: Mapping[str, Any] | None = None, **_: Any
) -> ServerAdam:
    """:class:`ServerAdam` from the run config (``server-lr``, ``server-beta1``,
    ``server-beta2``, ``server-tau`` and the shared schedule keys)."""
    kwargs = {**guard_kwargs(cfg), **(strategy_kwargs or {})}
    return ServerAdam(
        eta=float(cfg["server-lr"]),
        beta_1=float(cfg["server-beta1"]),
        beta_2=float(cfg["server-beta2"]),
        tau=float(cfg["server-tau"]),
        **kwargs,
    )
