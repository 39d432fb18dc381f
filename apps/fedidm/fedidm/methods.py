"""The FedIDM app's method table: the run-config key ``method``.

FedIDM (Reconstruction of arXiv:2604.15115), FedAvg, Flower's robust strategies used as they are
(FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) and FLTrust (``strategies/fltrust.py``).
Krum, MultiKrum and Bulyan are told the number of malicious clients ``f =
floor(attack-fraction * n)`` (Bulyan at most ``(n - 3) // 4``, its bound).
"""

from __future__ import annotations

import math
from typing import Any

from flwr.serverapp import strategy as flower

from fedidm.task import client_train, client_train_idm, root_update, server_fns
from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import baseline_methods, guard_kwargs
from flowerbed.strategies.fedidm import FedIDM
from flowerbed.strategies.fltrust import FLTrust


def make_fedidm(cfg, num_nodes: int = 0, num_classes: int = 10, **_: Any) -> FedIDM:
    train_fn, loss_fn, predict_fn = server_fns(cfg)
    return FedIDM(
        train_fn,
        loss_fn,
        predict_fn,
        num_classes,
        tau_cos=cfg["tau-cos"],
        mad_c=cfg["mad-c"],
        clip=cfg["clip"],
        fallback=cfg["fallback"],
        rectify=cfg["rectify"],
        finetune=cfg["finetune"],
        finetune_from=cfg["finetune-from"],
        **guard_kwargs(cfg),
    )


def make_fltrust(cfg, **_: Any) -> FLTrust:
    return FLTrust(root_update(cfg), **guard_kwargs(cfg))


def _flower_kwargs(cfg) -> dict[str, Any]:
    return {
        "fraction_train": cfg["fraction-train"],
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }


def _f(cfg, num_nodes: int) -> int:
    return (
        int(math.floor(cfg["attack-fraction"] * num_nodes + 1e-9)) if cfg["attack"] != "none" else 0
    )


def make_median(cfg, **_: Any):
    return flower.FedMedian(**_flower_kwargs(cfg))


def make_trimmed(cfg, **_: Any):
    return flower.FedTrimmedAvg(beta=cfg["trim-beta"], **_flower_kwargs(cfg))


def make_krum(cfg, num_nodes: int = 0, **_: Any):
    return flower.Krum(num_malicious_nodes=_f(cfg, num_nodes), **_flower_kwargs(cfg))


def make_multikrum(cfg, num_nodes: int = 0, **_: Any):
    f = _f(cfg, num_nodes)
    return flower.MultiKrum(
        num_malicious_nodes=f, num_nodes_to_select=max(num_nodes - f, 1), **_flower_kwargs(cfg)
    )


def make_bulyan(cfg, num_nodes: int = 0, **_: Any):
    f = min(_f(cfg, num_nodes), max((num_nodes - 3) // 4, 0))
    return flower.Bulyan(num_malicious_nodes=f, **_flower_kwargs(cfg))


METHODS = MethodTable(
    Method(
        "fedidm",
        "reconstruction",
        "FedIDM (Yang et al., arXiv 2604.15115): condensed-data direction and loss checks",
        strategy=make_fedidm,
        client=client_train_idm,
    ),
    *baseline_methods("fedavg", client=client_train),
    Method(
        "fedmedian", "baseline", "coordinate median (Flower's FedMedian)", make_median, client_train
    ),
    Method(
        "fedtrimmedavg",
        "baseline",
        "trimmed mean, beta = trim-beta (Flower's FedTrimmedAvg)",
        make_trimmed,
        client_train,
    ),
    Method(
        "krum", "baseline", "Krum (Flower's), f = floor(attack-fraction n)", make_krum, client_train
    ),
    Method(
        "multikrum",
        "baseline",
        "Multi-Krum (Flower's), selects n - f",
        make_multikrum,
        client_train,
    ),
    Method("bulyan", "baseline", "Bulyan (Flower's), f <= (n - 3) / 4", make_bulyan, client_train),
    Method(
        "fltrust",
        "baseline",
        "FLTrust (Cao et al., NDSS 2021), root set of root-size images",
        make_fltrust,
        client_train,
    ),
)
