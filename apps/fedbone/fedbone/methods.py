"""The FedBone app's method table: the run-config key ``method``.

| method | kind | what it is |
|---|---|---|
| ``fedbone`` | paper | split learning + GPAggregation (attention to history, PCGrad, mean) |
| ``split-pcgrad`` | ablation | split learning + PCGrad projection only |
| ``split-avg`` | baseline | split learning with plain averaging of the clients' G gradients |
| ``fedavg`` | baseline | each client trains its whole model; Flower's FedAvg averages G |
| ``local`` | baseline | each client trains its whole model alone (no averaging) |

Flags: ``split`` (the per-batch split protocol), ``attention`` / ``projection`` (GPAggregation's
two switches), ``local`` (the client keeps its own G).
"""

from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import make_fedavg
from flowerbed.strategies.fedbone import FedBone, mean_by_key


def make_split(cfg, general=None, min_nodes: int = 1, flags=None, **_):
    """The FedBone protocol on the server's general model, switches from the method's flags."""
    flags = flags or {}
    return FedBone(
        general,
        steps=cfg["steps"],
        attention=bool(flags.get("attention", True)),
        projection=bool(flags.get("projection", True)),
        history_beta=cfg["history-beta"],
        seed=cfg["seed"],
        min_nodes=min_nodes,
        fraction_train=cfg["fraction-train"],
    )


def make_whole(cfg, **_):
    """flowerbed's FedAvg (Flower's FedAvg with reply guards) over G, evaluating every client
    each round; metrics of different tasks are averaged per key."""
    return make_fedavg(
        cfg,
        strategy_kwargs={
            "fraction_evaluate": 1.0,
            "train_metrics_aggr_fn": mean_by_key,
            "evaluate_metrics_aggr_fn": mean_by_key,
        },
    )


def _split(name, kind, help, attention, projection) -> Method:
    flags = {"split": True, "attention": attention, "projection": projection}
    return Method(
        name,
        kind,
        help,
        strategy=lambda cfg, **kw: make_split(cfg, flags=flags, **kw),
        flags=flags,
    )


METHODS = MethodTable(
    _split(
        "fedbone",
        "paper",
        "FedBone (Chen et al., JCST 2024): split learning, GPAggregation = attention to the "
        "history of aggregated gradients (Reconstruction) + PCGrad projection + mean",
        True,
        True,
    ),
    _split(
        "split-pcgrad",
        "ablation",
        "split learning + PCGrad projection of conflicting client gradients, no attention",
        False,
        True,
    ),
    _split(
        "split-avg",
        "baseline",
        "split learning with plain averaging of the clients' gradients of G",
        False,
        False,
    ),
    Method(
        "fedavg",
        "baseline",
        "FedAvg (McMahan et al., AISTATS 2017): whole model trained locally, G averaged by "
        "Flower's FedAvg; client parts stay local",
        strategy=make_whole,
        flags={"split": False, "local": False},
    ),
    Method(
        "local",
        "baseline",
        "local-only: every client trains its whole model alone, nothing averaged",
        strategy=make_whole,
        flags={"split": False, "local": True},
    ),
)
