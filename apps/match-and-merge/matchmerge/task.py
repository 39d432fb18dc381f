"""Match-and-merge app: run-config schema, the clients' domains and LMs, the N-best sets.

Client ``k`` holds the text of domain ``k % num-domains`` (the ``text-domain`` partitioner; domains:
:mod:`matchmerge.domains`) and trains the LM of entry ``k % len`` of ``lm-plan`` on it
(``ngram<n>``: a character n-gram of order n; ``gru``: the tiny character GRU; both in
:mod:`matchmerge.lm`). The server holds the dev and test N-best lists of every domain
(:mod:`matchmerge.nbest`).
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import MetricRecord, RecordDict

from flowerbed.common import config as C
from flowerbed.common.client import partition_of
from flowerbed.common.partition import generated_partitioner, register_partitioner
from flowerbed.common.seeding import derive_seed
from flowerbed.common.train import get_device
from flowerbed.strategies.match_merge import LM_KEY, META_KEY
from matchmerge import domains as D
from matchmerge.lm import GRULM, NGramLM


def _plan_ok(text: str) -> bool:
    try:
        lm_specs(text)
    except ValueError:
        return False
    return True


SCHEMA: dict[str, C.Option] = C.compose(
    {"round-timeout": C.SCHEDULE["round-timeout"]},
    {"partitioner": C.DATA["partitioner"]},
    C.DEVICE,
    C.RESULTS,
    {
        "num-server-rounds": C.Option(1, lambda v: v == 1, "1 (one upload, one search)"),
        "method": C.Option("rmma"),  # choices from the method table
        # --- clients and their LMs
        "num-domains": C.Option(7, lambda v: 1 <= v <= len(D.TOPICS), "domains in 1..7"),
        "lm-plan": C.Option(
            "ngram2,ngram3,ngram4,ngram3,gru,gru,gru",
            _plan_ok,
            "comma-separated ngram<1..6> | gru, client k takes entry k % length",
        ),
        "train-sentences": C.Option(1500, C.positive, "LM-training sentences per client > 0"),
        "kappa": C.Option(1.0, C.positive, "n-gram smoothing mass > 0"),
        "gru-hidden": C.Option(64, C.positive, "GRU hidden units > 0"),
        "gru-steps": C.Option(300, C.positive, "GRU Adam steps > 0"),
        "gru-lr": C.Option(3e-3, C.positive, "GRU learning rate > 0"),
        "batch-size": C.Option(32, C.positive, "GRU sentences per step > 0"),
        # --- N-best lists (server's dev and test sets)
        "nbest-source": C.Option(
            "simulated",
            choices=("simulated", "pocketsphinx"),
            help="simulated (SYNTHETIC) | pocketsphinx (python -m matchmerge.prepare)",
        ),
        "nbest": C.Option(10, C.positive, "N: hypotheses per utterance > 0"),
        "dev-per-domain": C.Option(20, C.positive, "dev utterances per domain > 0"),
        "test-per-domain": C.Option(40, C.positive, "test utterances per domain > 0"),
        "sim-ref-rate": C.Option(0.5, C.unit_interval, "simulated: P(reference in the list)"),
        "sim-edits": C.Option(0.3, C.non_negative, "simulated: mean extra edits per 10 chars"),
        "sim-am-scale": C.Option(1.0, C.non_negative, "simulated: AM score per edit >= 0"),
        "sim-am-noise": C.Option(2.0, C.non_negative, "simulated: AM score noise std >= 0"),
        # --- rescoring and search
        "alpha": C.Option(1.0, C.non_negative, "LM weight of the rescoring >= 0"),
        "beta": C.Option(1.5, help="length bonus per character of the rescoring"),
        "budget": C.Option(600, C.positive, "most dev-CER evaluations of a search > 0"),
        "population": C.Option(20, lambda v: v >= 2, "GMMA population >= 2"),
        "generations": C.Option(30, C.positive, "GMMA generations > 0"),
        "tournament": C.Option(3, C.positive, "GMMA tournament size > 0"),
        "mutation-rate": C.Option(0.2, C.unit_interval, "GMMA mutation rate in [0, 1]"),
        "elite": C.Option(2, C.non_negative, "GMMA elite >= 0"),
        "episodes": C.Option(300, C.positive, "RMMA episodes > 0"),
        "rl-lr": C.Option(0.05, C.positive, "RMMA REINFORCE learning rate > 0"),
        "converge-tol": C.Option(0.001, C.non_negative, "dev-CER tolerance of convergence"),
    },
    partitioner="text-domain",
)


# Client ``k`` of ``K`` holds the text of domain ``k % num-domains`` (read by the client itself
# from the summaries package; no array data set behind it).
register_partitioner("text-domain", generated_partitioner)


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one line naming a bad key or value) and resolve ``method``."""
    from matchmerge.methods import METHODS

    return C.parse(run_config, {**SCHEMA, "method": METHODS.option("rmma")}, methods=METHODS)


def lm_specs(plan: str) -> list[tuple[str, int]]:
    """``[("ngram", order) | ("gru", 0)]`` of ``lm-plan``; ValueError on a bad entry."""
    out = []
    for item in plan.split(","):
        item = item.strip()
        if item == "gru":
            out.append(("gru", 0))
        elif item.startswith("ngram") and item[5:].isdigit() and 1 <= int(item[5:]) <= 6:
            out.append(("ngram", int(item[5:])))
        else:
            raise ValueError(f"lm-plan entry {item!r}")
    return out


#: the run-config keys a client's LM depends on (with the partition and the round)
LM_KEYS = (
    "seed",
    "num-domains",
    "lm-plan",
    "train-sentences",
    "kappa",
    "gru-hidden",
    "gru-steps",
    "gru-lr",
    "batch-size",
    "device",
)


def client_lm(cfg, partition_id: int, server_round: int):
    """This client's LM trained on its domain's text: ``(lm, domain, sentences)``.

    Training is deterministic in (the :data:`LM_KEYS` values, partition, round), so a process
    that runs several methods in a row (a sweep with ``launcher=local``) trains each LM once.
    """
    key = tuple(cfg[k] for k in LM_KEYS)
    return _trained(key, int(partition_id), int(server_round))


@lru_cache(maxsize=32)
def _trained(key: tuple, partition_id: int, server_round: int):
    cfg = dict(zip(LM_KEYS, key, strict=True))
    dom = partition_id % cfg["num-domains"]
    kind, order = lm_specs(cfg["lm-plan"])[partition_id % len(lm_specs(cfg["lm-plan"]))]
    text = D.lm_text(dom, cfg["train-sentences"])
    if kind == "ngram":
        return NGramLM.train(text, order, cfg["kappa"]), dom, len(text)
    seed = derive_seed(cfg["seed"], partition_id, server_round)
    lm = GRULM.train(
        text,
        seed,
        steps=cfg["gru-steps"],
        batch_size=cfg["batch-size"],
        lr=cfg["gru-lr"],
        hidden=cfg["gru-hidden"],
        device=get_device(cfg["device"]),
        log_every=100,
    )
    return lm, dom, len(text)


def client_upload(msg, context, cfg) -> RecordDict:
    """The client step of every method: train the local LM, send it with its description."""
    pid, _ = partition_of(context)
    rnd = int(msg.content["config"].get("server-round", 1)) if "config" in msg.content else 1
    lm, dom, n = client_lm(cfg, pid, rnd)
    meta = {**lm.metrics(), "partition-id": pid, "domain": dom, "num-examples": n}
    return RecordDict({LM_KEY: lm.arrays(), META_KEY: MetricRecord(meta)})
