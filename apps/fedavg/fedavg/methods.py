"""The FedAvg app's method table: the run-config key ``method``.

| method | kind | what it is |
|---|---|---|
| ``fedavg`` | baseline | FedAvg (McMahan et al., AISTATS 2017) |
| ``fedprox`` | baseline | FedProx (Li et al., MLSys 2020): Flower's FedProx, mu = proximal-mu |

Both run the shared client step (:func:`fedavg.task.client_train`); central DP and SecAgg+ are
options on top of either (``dp-noise-multiplier``, ``secagg``).
"""

from fedavg.task import client_train
from flowerbed.common.methods import MethodTable
from flowerbed.strategies.baselines import baseline_methods

METHODS = MethodTable(*baseline_methods("fedavg", "fedprox", client=client_train))
