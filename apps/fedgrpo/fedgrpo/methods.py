"""The FedGRPO app's method table: the run-config key ``method``.

| method | kind | what it is |
|---|---|---|
| ``fedgrpo-graph`` | reconstruction | FedGRPO with the confidence graph (Reconstruction) |
| ``fedgrpo-random`` | paper | FedGRPO as released: M experts drawn uniformly per prompt |
| ``grpo-central`` | baseline | centralized GRPO: the server scores with every exact reward |
| ``fedavg-sft`` | baseline | FedAvg over LoRA, clients fine-tune on their own examples |

Flag ``selection``: the strategy's expert selection (``graph``, ``random``, ``central``).
"""

from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import make_fedavg
from flowerbed.strategies.fedgrpo import FedGRPO


def make_fedgrpo(cfg, policy=None, scorer=None, aux=None, prompts=None, min_nodes=1, **_):
    """FedGRPO from the run config with the app's policy, prompts, scorer and auxiliary set."""
    return FedGRPO(
        policy,
        prompts,
        num_experts=cfg["num-experts"],
        group_size=cfg["group-size"],
        selection=cfg.method.flag("selection"),
        scorer=scorer,
        aux=aux,
        scale_rewards=cfg["scale-rewards"],
        seed=cfg["seed"],
        min_nodes=min_nodes,
    )


def make_sft(cfg, **_):
    """flowerbed's FedAvg (Flower's FedAvg with reply guards) over the LoRA adapter."""
    return make_fedavg(cfg)


def _grpo(name: str, kind: str, selection: str, help: str) -> Method:
    return Method(name, kind, help, strategy=make_fedgrpo, flags={"selection": selection})


METHODS = MethodTable(
    _grpo(
        "fedgrpo-graph",
        "reconstruction",
        "graph",
        "FedGRPO (Zhu et al., AAAI 2026): top-M experts of the confidence graph (Reconstruction)",
    ),
    _grpo(
        "fedgrpo-random",
        "paper",
        "random",
        "FedGRPO as in the authors' release: M experts drawn uniformly per prompt",
    ),
    _grpo(
        "grpo-central",
        "baseline",
        "central",
        "centralized GRPO: the server scores every completion with the exact rewards",
    ),
    Method(
        "fedavg-sft",
        "baseline",
        "FedAvg-SFT: FedAvg over the LoRA adapter, clients fine-tune on their own examples",
        strategy=make_sft,
        flags={"selection": "none"},
    ),
)
