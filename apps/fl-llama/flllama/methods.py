"""The FL-LLaMA app's method table: the run-config key ``method``.

| method | kind | what it is |
|---|---|---|
| ``split-sequential`` | paper | FL-LLaMA split training, clients take turns |
| ``split-client-batch`` | paper | the server batches every client's hidden states |
| ``split-hierarchical`` | paper | one server replica of B per client, averaged each round |
| ``centralized`` | baseline | LoRA fine-tuning of the whole model on the pooled batches |

Flag ``mode``: the strategy's parallel mode.
"""

from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import baseline_methods
from flowerbed.strategies.fl_llama import FLLlama


def make_split(cfg, min_nodes: int = 1, server=None, hidden_size: int = 0, mode: str = "", **_):
    """The split-training protocol with the server's block B."""
    return FLLlama(
        server,
        hidden_size,
        mode=mode,
        sync_steps=cfg["sync-steps"],
        min_nodes=min_nodes,
        sync_every=cfg["sync-every"],
    )


def _split(name: str, mode: str, help: str) -> Method:
    return Method(
        name,
        "paper",
        help,
        strategy=lambda cfg, **kw: make_split(cfg, **{**kw, "mode": mode}),
        flags={"mode": mode, "split": True},
    )


METHODS = MethodTable(
    _split(
        "split-sequential",
        "sequential",
        "FL-LLaMA (Zhang et al., arXiv:2505.15683): A/C on clients, B on the server, LoRA each; "
        "clients take turns, A/C averaged every sync-steps",
    ),
    _split(
        "split-client-batch",
        "client-batch",
        "FL-LLaMA client-batch mode: the server concatenates the clients' hidden states",
    ),
    _split(
        "split-hierarchical",
        "server-hierarchical",
        "FL-LLaMA server-hierarchical mode: one B replica per client, averaged every sync-steps",
    ),
    *baseline_methods("centralized", split=False),
)
