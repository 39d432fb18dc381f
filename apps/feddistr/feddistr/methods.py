"""The FedDistr app's method table: the run-config key ``method``.

| method | kind | what it is |
|---|---|---|
| ``feddistr`` | reconstruction | FedDistr: one upload of base distributions (means inverted
  against the frozen generator), alignment, synthesis |
| ``feddistr-noinv`` | ablation | FedDistr without the client-side inversion (code moments only) |
| ``feddistr-noalign`` | ablation | FedDistr without Active Distribution Alignment (no merging) |
| ``fedavg`` | baseline | FedAvg, ``num-server-rounds`` rounds on the same partitions |
| ``fedprox`` | baseline | Flower's FedProx, mu = ``proximal-mu`` |
| ``centralized`` | baseline | the classifier trained on the pooled private data |

Flags read by the ClientApp: ``invert`` (False: ``inversion-steps`` is ignored, 0 steps).
Flags read by the ServerApp: ``rounds`` (one-shot methods run that many rounds, whatever
``num-server-rounds`` says), ``align`` (FedDistr's alignment), ``model_delivery`` (report the
bytes of sending the trained model to every client, which a one-shot protocol does not do) and
``raw_upload`` (``centralized``: the bytes of uploading the raw data count as communication).
"""

from __future__ import annotations

from typing import Any

from feddistr.task import client_train, client_upload_step
from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import baseline_methods
from flowerbed.strategies.feddistr import FedDistr


def feddistr_strategy(
    cfg: dict[str, Any], cond_dim: int, sample, train_classifier, prepare=None, **_: Any
) -> FedDistr:
    """:class:`~flowerbed.strategies.feddistr.FedDistr` from the run config; the generator's
    ``sample``, the ``train_classifier`` step and ``prepare`` come from the ServerApp."""
    return FedDistr(
        cond_dim,
        sample,
        train_classifier,
        synthetic_per_class=cfg["synthetic-per-class"],
        threshold=cfg["match-threshold"],
        same_label=cfg["match-same-label"],
        align=cfg.method.flag("align", True),
        min_uploads=cfg["min-train-replies"],
        prepare=prepare,
    )


ONE_SHOT = {"rounds": 1, "model_delivery": True}


def one_shot(name: str, kind: str, description: str, align: bool, invert: bool) -> Method:
    """A row of the one-shot FedDistr pipeline (the strategy and client step are shared)."""
    flags = {**ONE_SHOT, "align": align, "invert": invert}
    return Method(name, kind, description, strategy=feddistr_strategy,
                  client=client_upload_step, flags=flags)  # fmt: skip


METHODS = MethodTable(
    one_shot(
        "feddistr",
        "reconstruction",
        "FedDistr (Zhao et al., arXiv:2410.12530): one upload of base distributions (means "
        "inverted against the frozen generator), alignment, synthesis, training; one round",
        align=True,
        invert=True,
    ),
    one_shot(
        "feddistr-noinv",
        "ablation",
        "FedDistr without the client-side inversion: the clients upload the moments of their "
        "clusters' semantic codes as they are (the default path before issue #13)",
        align=True,
        invert=False,
    ),
    one_shot(
        "feddistr-noalign",
        "ablation",
        "FedDistr without Active Distribution Alignment: every uploaded distribution kept",
        align=False,
        invert=True,
    ),
    *baseline_methods("fedavg", "fedprox", client=client_train),
    *baseline_methods("centralized", rounds=1, raw_upload=True),
)
