"""The template app's method table: one row per value of the run-config key ``method``.

A new app puts its paper's method first, with its strategy factory from
``strategies/<name>.py``, then its ablations (the same strategy with flags) and the shared
baselines::

    METHODS = MethodTable(
        Method("mymethod", "paper", "My method (Author et al., Venue Year)",
               strategy=make_mymethod, client=client_train, flags={"calibrate": True}),
        Method("mymethod-nocal", "ablation", "without calibration",
               strategy=make_mymethod, client=client_train, flags={"calibrate": False}),
        *baseline_methods("fedavg", "fedprox", client=client_train),
    )

The code then reads ``cfg.method.strategy``, ``cfg.method.client`` and ``cfg.method.flag(...)``
and never compares method names.
"""

from flowerbed.common.methods import MethodTable
from flowerbed.strategies.baselines import baseline_methods
from template.task import client_train

METHODS = MethodTable(
    *baseline_methods("fedavg", "fedprox", "local", "centralized", client=client_train)
)
