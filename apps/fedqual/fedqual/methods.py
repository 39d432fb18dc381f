"""The FedQual app's method table: the run-config key ``method``.

| method | kind | what it is |
|---|---|---|
| ``fedqual`` | reconstruction | FedQual: reliability weights ``n_k q_k^gamma`` + calibration |
| ``fedqual-nocal`` | ablation | FedQual without the calibration (reliability weights only) |
| ``fedqual-noweight`` | ablation | FedQual without the reliability weights (calibration only) |
| ``uniform-cal`` | baseline | uniform calibration: alpha = ``uniform-alpha`` for every client |
| ``fedavg`` | baseline | FedAvg (McMahan et al., AISTATS 2017) |
| ``fedprox`` | baseline | FedProx (Li et al., MLSys 2020): Flower's FedProx, mu = proximal-mu |
| ``local`` | baseline | local-only: every client trains its own model, no averaging |
| ``central-clean`` | baseline | centralized on the pooled train split with the clean labels |
| ``central-noisy`` | baseline | centralized on the pooled train split as the clients annotated it |

Every row's strategy is called as ``strategy(cfg, evaluate_each=..., fit=...)`` by the
ServerApp; every federated row runs the one client step :func:`fedqual.task.client_step`.
Flags: ``calibrate`` (clients calibrate towards the anchor, the server sends ``alpha-max``),
``reliability`` (quality-weighted aggregation), ``uniform`` (the server sends ``uniform-alpha``
and every client calibrates with it), ``clean`` (centralized on the clean labels).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fedqual.task import client_step
from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import baseline_methods, guard_kwargs
from flowerbed.strategies.fedqual import FedQual, mean_train_metrics


def make_fedqual(cfg, **_: Any) -> FedQual:
    """:class:`~flowerbed.strategies.fedqual.FedQual` with the row's ablation flags."""
    m = cfg.method
    return FedQual(
        reliability_power=cfg["reliability-power"],
        use_reliability=m.flag("reliability", True),
        alpha_max=cfg["alpha-max"] if m.flag("calibrate", True) else 0.0,
        uniform_alpha=cfg["uniform-alpha"] if m.flag("uniform", False) else None,
        **guard_kwargs(cfg),
    )


def _fedqual_metrics(make):
    """A shared FedAvg-shaped baseline whose training metrics leave out the partition id."""

    def strategy(cfg, **_: Any):
        return make(cfg, strategy_kwargs={"train_metrics_aggr_fn": mean_train_metrics})

    strategy.__doc__ = make.__doc__
    return strategy


_fedavg, _fedprox, _local, _central = baseline_methods(
    "fedavg", "fedprox", "local", "centralized", client=client_step, calibrate=False
)
_CLEAN = "centralized on the pooled train split with the clean labels (rounds x local-epochs)"
_NOISY = "centralized on the pooled train split as the clients annotated it (corrupted labels)"


def _fedqual_row(
    name: str, kind: str, help: str, calibrate: bool, reliability: bool, uniform: bool = False
) -> Method:
    """FedQual, its ablations or the uniform calibration: one strategy and client step, three
    switches."""
    flags = {"calibrate": calibrate, "reliability": reliability, "uniform": uniform}
    return Method(name, kind, help, strategy=make_fedqual, client=client_step, flags=flags)


METHODS = MethodTable(
    _fedqual_row(
        "fedqual",
        "reconstruction",
        "FedQual: reliability weights n_k q_k^gamma + calibration towards the global anchor",
        calibrate=True,
        reliability=True,
    ),
    _fedqual_row(
        "fedqual-nocal",
        "ablation",
        "FedQual without the calibration (reliability weights only)",
        calibrate=False,
        reliability=True,
    ),
    _fedqual_row(
        "fedqual-noweight",
        "ablation",
        "FedQual without the reliability weights (calibration only, FedAvg's n_k weights)",
        calibrate=True,
        reliability=False,
    ),
    _fedqual_row(
        "uniform-cal",
        "baseline",
        "uniform calibration (the paper's theorem's comparison, reconstructed): every client "
        "calibrates with alpha = uniform-alpha; FedQual's reliability weights",
        calibrate=True,
        reliability=True,
        uniform=True,
    ),
    replace(_fedavg, strategy=_fedqual_metrics(_fedavg.strategy)),
    replace(_fedprox, strategy=_fedqual_metrics(_fedprox.strategy)),
    _local,
    replace(_central, name="central-clean", help=_CLEAN, flags={"clean": True}),
    replace(_central, name="central-noisy", help=_NOISY, flags={"clean": False}),
)
