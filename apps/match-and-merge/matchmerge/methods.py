"""The match-and-merge app's method table: the run-config key ``method``.

| method | kind | what it is |
|---|---|---|
| ``rmma`` | paper | RMMA: REINFORCE over (pair, weight) merge actions (Reconstruction of the details) |
| ``gmma`` | paper | GMMA: genetic search over matchings and weights (Reconstruction of the details) |
| ``am-only`` | baseline | acoustic model only: the 1-best of each N-best list |
| ``best-single`` | baseline | the one client LM with the lowest dev CER |
| ``uniform`` | baseline | uniform linear interpolation of all client LMs |

Flag ``search``: the strategy's search (:class:`flowerbed.strategies.match_merge.MatchMerge`).
"""

from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.match_merge import MatchMerge
from matchmerge.lm import load_lm
from matchmerge.task import client_upload


def make_match_merge(cfg, dev=None, test=None, min_nodes=1, **_):
    """The strategy of every row: the row's search on the server's dev and test N-best lists."""
    return MatchMerge(
        cfg.method.flag("search"),
        load_lm,
        dev,
        test,
        alpha=cfg["alpha"],
        beta=cfg["beta"],
        seed=cfg["seed"],
        min_nodes=min_nodes,
        budget=cfg["budget"],
        gmma_kwargs={
            "population": cfg["population"],
            "generations": cfg["generations"],
            "tournament_size": cfg["tournament"],
            "mutation_rate": cfg["mutation-rate"],
            "elite": cfg["elite"],
        },
        rmma_kwargs={"episodes": cfg["episodes"], "lr": cfg["rl-lr"]},
        tol=cfg["converge-tol"],
    )


def _row(name: str, kind: str, help: str) -> Method:
    return Method(
        name, kind, help, strategy=make_match_merge, client=client_upload, flags={"search": name}
    )


METHODS = MethodTable(
    _row(
        "rmma",
        "paper",
        "RMMA: REINFORCE over (pair, weight) merge actions (details: Reconstruction)",
    ),
    _row(
        "gmma",
        "paper",
        "GMMA: genetic search over matchings and merge weights (details: Reconstruction)",
    ),
    _row("am-only", "baseline", "acoustic model only: the 1-best of each N-best list"),
    _row("best-single", "baseline", "the one client LM with the lowest dev CER"),
    _row("uniform", "baseline", "uniform linear interpolation of all client LMs"),
)
