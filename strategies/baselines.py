"""The baselines every app runs the same way: FedAvg, FedProx, local-only and centralized.

- **FedAvg** (McMahan et al., AISTATS 2017, arXiv:1602.05629): :class:`flowerbed.strategies.fedavg.FedAvg`.
- **FedProx** (Li et al., MLSys 2020, arXiv:1812.06127): :class:`FedProx`, Flower's own
  ``FedProx`` strategy (it sends ``proximal-mu`` in the train config, so the server knows mu and
  the clients read it from the message) with flowerbed's reply guards.
- **Local-only**: :class:`LocalOnly`, every client trains its own model and nothing is averaged;
  the server-side metrics are the mean over clients of each client's model evaluated.
- **Centralized**: :class:`Centralized`, the pooled data trained on the server (no messages).

:func:`baseline_methods` gives the method-table rows of these, so an app's table lists them next to
its paper's method with one line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import FedProx as _FlowerFedProx

from flowerbed.common.client import LOCAL_ONLY
from flowerbed.common.methods import Method
from flowerbed.common.protocol import PhasedStrategy, Protocol, RoundOutcome, wait_for_nodes
from flowerbed.common.records import check_arrays
from flowerbed.strategies.fedavg import FedAvg


class FedProx(_FlowerFedProx, FedAvg):
    """Flower's FedProx with flowerbed's FedAvg guards (validation, failures, seeded sampling).

    Flower's :class:`flwr.serverapp.strategy.FedProx` adds ``proximal-mu`` to every train config;
    flowerbed's :class:`~flowerbed.strategies.fedavg.FedAvg` samples, validates and averages.

    Parameters
    ----------
    proximal_mu : float, default 0.0
        Weight ``mu`` of the proximal term ``mu/2 ||w - w_t||^2`` the clients add.
    **kwargs
        Passed to :class:`flowerbed.strategies.fedavg.FedAvg`.
    """

    def __init__(self, proximal_mu: float = 0.0, **kwargs: Any) -> None:
        FedAvg.__init__(self, **kwargs)
        self.proximal_mu = proximal_mu


class LocalOnly(PhasedStrategy):
    """Every client trains its own model from the initial one; nothing is averaged.

    Each round sends the initial model and ``local-only = True`` in the train config (the shared
    client step then continues from the model it kept in ``context.state``), evaluates every
    returned model with ``evaluate_each`` and reports the mean over clients as the server-side
    metrics. The global model never changes.

    Parameters
    ----------
    evaluate_each : callable
        ``evaluate_each(arrays) -> dict of metrics`` of one client's model.
    min_replies : int, default 1
        Valid replies needed; with fewer the round's metrics are left out.
    """

    def __init__(
        self, evaluate_each: Callable[[ArrayRecord], Mapping[str, float]], min_replies: int = 1
    ) -> None:
        self.evaluate_each = evaluate_each
        self.min_replies = min_replies
        self.history: dict[int, dict] = {}
        self._initial: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> LocalOnly: every client trains its own model")
        log(INFO, "\t└──> min_replies: %d", self.min_replies)

    def _check(self, msg: Message) -> str | None:
        if "arrays" not in msg.content.array_records:
            return "no ArrayRecord 'arrays'"
        return check_arrays(msg.content["arrays"], self._initial)

    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """Broadcast, let every client train its own model, evaluate each."""
        self._initial = arrays
        nodes = wait_for_nodes(protocol.grid)
        train_config["server-round"] = server_round
        train_config[LOCAL_ONLY] = True
        content = RecordDict({"arrays": arrays, "config": train_config})
        rep = protocol.broadcast("train", content, nodes, validate=self._check)
        per = {
            m.metadata.src_node_id: dict(self.evaluate_each(m.content["arrays"]))
            for m in rep.replies
        }
        self.history[server_round] = {"num_train_replies": len(per)}
        if len(per) < max(self.min_replies, 1):
            return RoundOutcome()
        keys = sorted(set.intersection(*(set(m) for m in per.values())))
        mean = {k: float(np.mean([m[k] for m in per.values()])) for k in keys}
        return RoundOutcome(server_metrics=MetricRecord(mean))


class Centralized(PhasedStrategy):
    """The pooled data trained on the server: no message is sent.

    Parameters
    ----------
    fit : callable
        ``fit(server_round, arrays) -> (arrays, metrics)``: one round of centralized training
        (e.g. ``local-epochs`` epochs over the pooled data) from ``arrays``.
    """

    def __init__(
        self, fit: Callable[[int, ArrayRecord], tuple[ArrayRecord, Mapping[str, float]]]
    ) -> None:
        self.fit = fit

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t└──> Centralized: the pooled data trained on the server")

    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """One round of server-side training (its row in ``results.json``: 0 bytes each way)."""
        protocol.round_row(server_round)
        new, metrics = self.fit(server_round, arrays)
        return RoundOutcome(arrays=new, train_metrics=MetricRecord(dict(metrics)))


# ---------------------------------------------------------------------------- method rows
def guard_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """FedAvg's constructor arguments from the shared run-config keys (those the app has)."""
    fraction = float(cfg.get("fraction-train", 1.0))
    return {
        "fraction_train": fraction,
        "fraction_evaluate": float(cfg.get("fraction-evaluate", 0.0)),
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
        "max_update_norm": float(cfg.get("max-update-norm", 0.0)) or None,
        "min_train_replies": int(cfg.get("min-train-replies", 1)),
        "sample_seed": int(cfg["seed"]) if fraction < 1 and "seed" in cfg else None,
    }


# The factories below take the app's context as keyword arguments and use what they need
# (``evaluate_each``, ``fit``, ``strategy_kwargs``), so one call serves every row of a table.


def make_fedavg(
    cfg: Mapping[str, Any], strategy_kwargs: Mapping[str, Any] | None = None, **_: Any
) -> FedAvg:
    """flowerbed FedAvg from the run config (``strategy_kwargs`` override)."""
    return FedAvg(**{**guard_kwargs(cfg), **(strategy_kwargs or {})})


def make_fedprox(
    cfg: Mapping[str, Any], strategy_kwargs: Mapping[str, Any] | None = None, **_: Any
) -> FedProx:
    """Flower's FedProx (with flowerbed's guards), mu from ``proximal-mu``."""
    kwargs = {**guard_kwargs(cfg), **(strategy_kwargs or {})}
    return FedProx(proximal_mu=float(cfg["proximal-mu"]), **kwargs)


def make_local_only(cfg: Mapping[str, Any], evaluate_each, **_: Any) -> LocalOnly:
    """:class:`LocalOnly` (``evaluate_each`` from the app)."""
    return LocalOnly(evaluate_each, min_replies=int(cfg.get("min-train-replies", 1)))


def make_centralized(cfg: Mapping[str, Any], fit, **_: Any) -> Centralized:
    """:class:`Centralized` (``fit`` from the app)."""
    return Centralized(fit)


_ROWS = {
    "fedavg": ("FedAvg (McMahan et al., AISTATS 2017)", make_fedavg),
    "fedprox": (
        "FedProx (Li et al., MLSys 2020): Flower's FedProx, mu = proximal-mu",
        make_fedprox,
    ),
    "local": ("local-only: every client trains its own model, no averaging", make_local_only),
    "centralized": ("centralized: the pooled client data trained on the server", make_centralized),
}


def baseline_methods(
    *names: str, client: Callable[..., Any] | None = None, **flags: Any
) -> list[Method]:
    """Method-table rows of the shared baselines (``"fedavg"``, ``"fedprox"``, ``"local"``,
    ``"centralized"``), with the app's client step and flags."""
    unknown = [n for n in names if n not in _ROWS]
    if unknown:
        raise ValueError(f"unknown baseline {unknown[0]!r}; known: {', '.join(_ROWS)}")
    return [
        Method(n, "baseline", _ROWS[n][0], strategy=_ROWS[n][1], client=client, flags=flags)
        for n in names
    ]
