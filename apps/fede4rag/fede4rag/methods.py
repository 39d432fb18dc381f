"""The FedE4RAG app's method table: the run-config key ``method``.

| method | kind | client | server |
|---|---|---|---|
| ``fede4rag`` | paper | persistent student, InfoNCE + lambda x MSE to the frozen global model | mean |
| ``fede4rag-reset`` | ablation | student restarts from the global model every round, same loss | mean |
| ``fedavg-infonce`` | baseline | student from the global model, InfoNCE only (lambda 0) | mean |
| ``local`` | baseline | each client trains its own model, InfoNCE only | none |
| ``centralized`` | baseline | InfoNCE on the pooled training pairs, on the server | none |

The mean is plaintext or CKKS (run-config key ``he``), for every federated row.
Flags: ``persistent`` (the student continues from the client's own model), ``distill`` (the
lambda term).
"""

from fede4rag.task import client_train
from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import baseline_methods
from flowerbed.strategies.fede4rag import EncryptedMean, make_plain_mean


def make_mean(cfg, num_values: int = 0, min_nodes: int = 1, **kw):
    """The server mean: plaintext (the authors') or under CKKS (``he = true``)."""
    if cfg["he"]:
        return EncryptedMean(
            num_values, min_nodes=min_nodes, min_replies=int(cfg["min-train-replies"])
        )
    return make_plain_mean(cfg, **kw)


def _row(name: str, kind: str, help: str, persistent: bool, distill: bool) -> Method:
    flags = {"persistent": persistent, "distill": distill}
    return Method(name, kind, help, strategy=make_mean, client=client_train, flags=flags)


METHODS = MethodTable(
    _row(
        "fede4rag",
        "paper",
        "FedE4RAG (Mao et al., arXiv:2504.19101): persistent local student, InfoNCE + "
        "lambda x MSE to the frozen global model's logits; server mean (CKKS with he = true)",
        persistent=True,
        distill=True,
    ),
    _row(
        "fede4rag-reset",
        "ablation",
        "FedE4RAG's loss with the student restarted from the global model every round",
        persistent=False,
        distill=True,
    ),
    _row(
        "fedavg-infonce",
        "baseline",
        "FedAvg with in-batch InfoNCE only (lambda 0), equal weights",
        persistent=False,
        distill=False,
    ),
    *baseline_methods("local", "centralized", client=client_train, persistent=False, distill=False),
)
