"""The PrivFusion app's method table: the run-config key ``method``.

| method | kind | what it is |
|---|---|---|
| ``privfusion`` | reconstruction | PrivFusion (Chen et al., TKDE 2024), one-shot; see the README |
| ``fedavg`` | baseline | FedAvg (McMahan et al., AISTATS 2017), from scratch, non-private |

Flag ``one-shot`` (privfusion): the protocol is one round (whatever ``num-server-rounds`` says,
whose default 10 is the FedAvg baseline's), its arrays are the MLP's layers and its server-side
metrics come from the fusion harness (:func:`privfusion.task.fusion_evaluator`). Flag
``final-prefix``: the prefix of the final metrics in ``results.json`` (``fedavg_accuracy``);
``headline``: the final metric printed at the end of a run.
"""

from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import baseline_methods
from flowerbed.strategies.privfusion import PrivFusion
from privfusion.task import fedavg_client, fusion_evaluator


def make_privfusion(cfg, min_nodes: int = 1, **_) -> PrivFusion:
    """The PrivFusion relay with the app's evaluation harness."""
    return PrivFusion(cfg["fusing-party"], evaluate=fusion_evaluator(cfg), min_nodes=min_nodes)


METHODS = MethodTable(
    Method(
        "privfusion",
        "reconstruction",
        "PrivFusion (Chen et al., TKDE 2024): DP-SGD parties, perturbed activation statistics, "
        "graph matching to the fusing party, fusion + DP adapter; one round (abstract only: "
        "reconstruction, see README)",
        strategy=make_privfusion,
        flags={"one-shot": True, "final-prefix": "", "headline": "privfusion_accuracy"},
    ),
    *baseline_methods(
        "fedavg",
        client=fedavg_client,
        **{"one-shot": False, "final-prefix": "fedavg_", "headline": "fedavg_accuracy"},
    ),
)
