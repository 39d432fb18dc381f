"""fed-retrieval's method table: one row per loss x {federated, IID-federated, centralized}.

Ning et al., arXiv:2108.07931, compare four losses (batch softmax, global softmax, hinge on
positives + spreadout, batch softmax + spreadout), each trained federated (users as clients,
client SGD, server Adam), federated on the IID control (the train examples shuffled across
users, each user keeping its count) and centralized (the pooled examples, the same model, loss
and SGD steps). The flags: ``loss`` (a key of :data:`fedretrieval.model.LOSSES`) and ``iid``.
"""

from fedretrieval.task import client_train
from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import make_centralized
from flowerbed.strategies.fed_retrieval import make_server_adam

_LOSSES = {
    "hinge-spreadout": ("paper", "hinge on positives + spreadout (batch-insensitive)"),
    "global-softmax": ("paper", "softmax over all items (batch-insensitive, expensive)"),
    "batch-softmax": ("baseline", "in-batch softmax (batch-sensitive)"),
    "batch-softmax-spreadout": ("ablation", "in-batch softmax + spreadout"),
}


def _rows(loss: str, kind: str, what: str) -> list[Method]:
    flags = {"loss": loss}
    fed = "users as clients, client SGD + server Adam (Flower's FedAdam)"
    return [
        Method(loss, kind, f"{what}; {fed}", make_server_adam, client_train, flags),
        Method(
            f"{loss}-iid",
            "baseline",
            f"{what}; IID control: examples shuffled across users, {fed}",
            make_server_adam,
            client_train,
            {**flags, "iid": True},
        ),
        Method(
            f"{loss}-centralized",
            "baseline",
            f"{what}; centralized: pooled train users, the same model, loss and SGD",
            make_centralized,
            client_train,
            flags,
        ),
    ]


METHODS = MethodTable(*(row for loss, (k, w) in _LOSSES.items() for row in _rows(loss, k, w)))
