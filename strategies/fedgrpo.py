"""FedGRPO: reward-only federated optimisation of a foundation model with group-relative rewards.

Zhu, Gu, Fan, Yang and Han, "FedGRPO: Privately Optimizing Foundation Models with Group-Relative
Rewards from Domain Clients", AAAI 2026, arXiv:2602.12014; code: github.com/Liar-Mask/FedGRPO
(commit e25963d, built on TRL's ``GRPOTrainer``).

The server holds the policy. Clients train nothing: they score candidate answers in their
domain and return scalar rewards only. One round of :class:`FedGRPO`
(:meth:`FedGRPO.run_round`):

1. ``probe`` (first round, graph selection only; RECONSTRUCTION, the confidence graph is not in
   the released code): every client scores the answers of a small labelled auxiliary set; the
   edge weight ``w(client, domain)`` is the agreement of its rewards with the server's reference
   rewards on that domain's auxiliary items (:func:`agreement`);
2. per prompt, ``M`` experts: the top-``M`` clients of the graph for the prompt's domain, the
   domain being that of the nearest auxiliary question (character-trigram cosine,
   :func:`nearest_domain`, :func:`top_experts`), or ``M`` clients drawn uniformly (the authors'
   release, :func:`random_experts`);
3. the server's policy generates ``G`` completions per expert (``G * M`` per prompt);
4. ``score``: each expert receives its groups (prompt text and ``G`` completions) and returns
   one finite scalar per completion (:func:`check_rewards` rejects anything else, with a named
   reason); ``M * G`` floats per prompt travel upstream;
5. the federated group-relative advantage over the ``G * M`` rewards of a prompt
   (:func:`group_advantages`; the authors' ``scale_rewards=False``: no division by the standard
   deviation), and the policy update with the clipped surrogate and the KL term to the
   reference policy (:func:`grpo_loss`; TRL's ``bnpo`` loss, epsilon 0.2 / 0.3, beta 1e-4).

The centralized GRPO baseline (``selection="central"``) scores every completion on the server
with the exact reward functions: no message is sent.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Protocol as TypingProtocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from flowerbed.common.protocol import PhasedStrategy, Protocol, RoundOutcome, wait_for_nodes
from flowerbed.common.seeding import derive_seed
from flowerbed.strategies.fedavg import query_partitions

PROBE, SCORE = "probe", "score"
SCORE_MESSAGE = "train.score"  # the ClientApp's scoring function (probe and score alike)
REWARDS_KEY = "rewards"  # the MetricRecord of a reply
REWARD_LIST = "r"  # its one key: a list of floats, one per completion
SELECTIONS = ("graph", "random", "central")


class FedGRPOError(RuntimeError):
    """A round that cannot run (fewer clients than experts per prompt, no probe replies)."""


# ---------------------------------------------------------------------------- GRPO pieces
def group_advantages(
    rewards: Sequence[float], scale: bool = False, eps: float = 1e-4
) -> np.ndarray:
    """The group-relative advantage of the completions of one prompt.

    ``A_i = r_i - mean(r)``, divided by ``std(r) + eps`` (unbiased std, as TRL) when ``scale``.

    Parameters
    ----------
    rewards : sequence of float
        The rewards of all completions of one prompt (the ``G * M`` of every expert group).
    scale : bool, default False
        Divide by the group's standard deviation (TRL's ``scale_rewards=True``); the authors run
        with ``scale_rewards=False``.
    eps : float, default 1e-4
        Added to the standard deviation (TRL's value).
    """
    r = np.asarray(rewards, dtype=np.float64)
    adv = r - r.mean()
    if scale:
        std = r.std(ddof=1) if r.size > 1 else 0.0
        adv = adv / (std + eps)
    return adv


def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """TRL's per-token estimator of KL(pi_theta || pi_ref): ``exp(d) - d - 1``, ``d = ref - logp``
    (k3 of Schulman's note: unbiased, always >= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.3,
    beta: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate with the KL term, per token, averaged over the unmasked tokens.

    ``rho = exp(logp - old_logp)``; per token
    ``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta KL``;
    the loss is ``sum(per_token * mask) / sum(mask)`` (TRL's ``loss_type="bnpo"``).

    Parameters
    ----------
    logp, old_logp, ref_logp : Tensor (n, T)
        Log-probabilities of the completion tokens under the current policy (with gradient),
        the policy that generated them, and the reference policy (None: ``beta`` must be 0).
    advantages : Tensor (n,)
        One advantage per completion.
    mask : Tensor (n, T)
        1 for a completion token, 0 for padding (and truncated completions, if masked).
    eps_low, eps_high : float, default 0.2, 0.3
        The clip range (the authors' values).
    beta : float, default 1e-4
        Weight of the KL term (the authors' value).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype)[:, None]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    per_token = -surrogate
    m = mask.to(logp.dtype)
    denom = m.sum().clamp(min=1.0)
    stats = {}
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("grpo_loss: beta != 0 needs the reference log-probabilities")
        kl = per_token_kl(logp, ref_logp)
        per_token = per_token + beta * kl
        stats["kl"] = float((kl.detach() * m).sum() / denom)
    clipped = ((ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)).to(logp.dtype)
    stats["clip_fraction"] = float((clipped.detach() * m).sum() / denom)
    return (per_token * m).sum() / denom, stats


# ---------------------------------------------------------------------------- expert selection
def trigrams(text: str) -> Counter:
    """Character trigrams of the lower-cased text, digits folded to ``0`` (the question's shape,
    not its numbers)."""
    t = "".join("0" if c.isdigit() else c for c in f"  {text.lower()} ")
    return Counter(t[i : i + 3] for i in range(len(t) - 2))


def _cosine(a: Counter, b: Counter) -> float:
    dot = sum(v * b.get(k, 0) for k, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


def nearest_domain(question: str, aux_questions: Sequence[str], aux_domains: Sequence[int]) -> int:
    """The domain of the auxiliary question nearest to ``question`` (trigram cosine; the first
    one on ties)."""
    q = trigrams(question)
    sims = [_cosine(q, trigrams(a)) for a in aux_questions]
    return int(aux_domains[int(np.argmax(sims))])


def agreement(
    client_rewards: Sequence[float],
    reference_rewards: Sequence[float],
    domains: Sequence[int],
    num_domains: int,
    reward_range: float,
) -> np.ndarray:
    """Edge weights of one client: per domain ``1 - mean |r_client - r_ref| / reward_range`` over
    that domain's auxiliary items (1: agrees with every reference reward; 0 if no item)."""
    c = np.asarray(client_rewards, dtype=np.float64)
    r = np.asarray(reference_rewards, dtype=np.float64)
    d = np.asarray(domains)
    w = np.zeros(num_domains)
    for k in range(num_domains):
        sel = d == k
        if sel.any():
            w[k] = 1.0 - float(np.mean(np.abs(c[sel] - r[sel]))) / reward_range
    return w


def top_experts(weights: np.ndarray, domain: int, m: int) -> list[int]:
    """The ``m`` clients (rows of ``weights``, clients x domains) with the largest weight for
    ``domain``; ties go to the lower client index."""
    col = np.asarray(weights, dtype=np.float64)[:, domain]
    order = sorted(range(len(col)), key=lambda i: (-col[i], i))
    return order[:m]


def random_experts(num_clients: int, m: int, seed: int) -> list[int]:
    """``m`` of ``num_clients`` clients drawn uniformly without replacement from ``seed``."""
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(num_clients, size=m, replace=False)]


# ---------------------------------------------------------------------------- replies
def check_rewards(msg: Message, expected: int) -> str | None:
    """Why a scoring reply must be rejected (None: valid): it must carry exactly one finite scalar
    per completion it was sent, as the list ``rewards["r"]``, and nothing else."""
    content = msg.content
    if REWARDS_KEY not in content.metric_records:
        return f"no MetricRecord {REWARDS_KEY!r}"
    extra = sorted(k for k in content.keys() if k != REWARDS_KEY)
    if extra:
        return f"reply carries more than the rewards: {', '.join(extra)}"
    rec = content[REWARDS_KEY]
    if set(rec.keys()) != {REWARD_LIST}:
        return f"rewards must have the one key {REWARD_LIST!r}, got {sorted(rec.keys())}"
    r = rec[REWARD_LIST]
    if not isinstance(r, list):
        return f"rewards are not a list of scalars (got {type(r).__name__})"
    if len(r) != expected:
        return f"expected {expected} rewards (one per completion), got {len(r)}"
    for i, v in enumerate(r):
        if isinstance(v, bool) or not isinstance(v, int | float):
            return f"reward {i} is not a number"
        if not math.isfinite(v):
            return f"reward {i} is not finite ({v})"
    return None


def score_content(
    server_round: int, questions: Sequence[str], completions: Sequence[Sequence[str]]
):
    """The message of a scoring call: every group's prompt and its completions (text only)."""
    sizes = {len(c) for c in completions}
    if len(sizes) > 1:
        raise ValueError("score_content: groups of different sizes")
    return RecordDict(
        {
            "config": ConfigRecord(
                {
                    "server-round": int(server_round),
                    "questions": [str(q) for q in questions],
                    "completions": [str(t) for c in completions for t in c],
                    "group-size": sizes.pop() if sizes else 0,
                }
            )
        }
    )


# ---------------------------------------------------------------------------- the strategy
class Policy(TypingProtocol):
    """What the strategy needs of the server's policy (the app's language model)."""

    def generate(self, questions: Sequence[str], n: int, seed: int) -> list[list[str]]:
        """``n`` sampled completions for each question."""

    def update(
        self,
        questions: Sequence[str],
        completions: Sequence[Sequence[str]],
        advantages: Sequence[np.ndarray],
        seed: int,
    ) -> dict[str, float]:
        """Policy-gradient step(s) on the completions with their advantages."""

    def arrays(self) -> ArrayRecord:
        """The trained parameters (LoRA adapter)."""


#: ``score(question, completions) -> rewards``: the server's exact reward (central baseline,
#: reference rewards of the auxiliary set, the reward-error metric).
Scorer = Callable[[str, Sequence[str]], np.ndarray]


@dataclass
class AuxSet:
    """The server's small labelled auxiliary set (RECONSTRUCTION of the confidence graph).

    Attributes
    ----------
    questions : list of str
        Auxiliary questions.
    domains : list of int
        The domain of each question.
    completions : list of list of str
        Candidate answers shown to the clients for each question (a correct and a wrong one).
    num_domains : int
        Number of domains.
    """

    questions: list[str]
    domains: list[int]
    completions: list[list[str]]
    num_domains: int


class FedGRPO(PhasedStrategy):
    """FedGRPO's round: expert selection, server generation, reward-only scoring, GRPO update.

    Parameters
    ----------
    policy : Policy
        The server's policy (generate, update, arrays).
    prompts : callable
        ``prompts(server_round) -> list of str``: the round's training questions.
    num_experts : int, default 2
        ``M``: experts (clients) per prompt.
    group_size : int, default 4
        ``G``: completions per expert.
    selection : str, default "graph"
        ``graph`` (confidence graph, needs ``aux`` and ``scorer``), ``random`` (the authors'
        release) or ``central`` (centralized GRPO: the server scores with ``scorer``).
    scorer : Scorer or None, default None
        The server's exact reward (reference rewards of ``aux``; all rewards when central; the
        ``reward_error`` metric).
    aux : AuxSet or None, default None
        The auxiliary set of the confidence graph.
    scale_rewards : bool, default False
        Divide advantages by the group's standard deviation (:func:`group_advantages`).
    reward_range : float, default 10.0
        ``max - min`` of a reward (``8 + 1 + 1``), the scale of :func:`agreement`.
    seed : int, default 0
        Run seed (random selection and generation are seeded by (seed, round, prompt)).
    min_nodes : int, default 1
        Nodes that must be connected before a round starts.

    Attributes
    ----------
    graph : ndarray or None
        Confidence graph, partition id x domain, once probed.
    history : dict of int to dict
        Per round: prompts, groups scored and dropped, mean reward, reward error, floats and
        bytes upstream per prompt, loss.
    """

    def __init__(
        self,
        policy: Policy,
        prompts: Callable[[int], list[str]],
        num_experts: int = 2,
        group_size: int = 4,
        selection: str = "graph",
        scorer: Scorer | None = None,
        aux: AuxSet | None = None,
        scale_rewards: bool = False,
        reward_range: float = 10.0,
        seed: int = 0,
        min_nodes: int = 1,
    ) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection {selection!r}: one of {', '.join(SELECTIONS)}")
        if selection == "graph" and (aux is None or scorer is None):
            raise ValueError("graph selection needs the auxiliary set and the server's scorer")
        if selection == "central" and scorer is None:
            raise ValueError("central selection needs the server's scorer")
        self.policy = policy
        self.prompts = prompts
        self.num_experts = int(num_experts)
        self.group_size = int(group_size)
        self.selection = selection
        self.scorer = scorer
        self.aux = aux
        self.scale_rewards = bool(scale_rewards)
        self.reward_range = float(reward_range)
        self.seed = int(seed)
        self.min_nodes = int(min_nodes)
        self.graph: np.ndarray | None = None
        self.history: dict[int, dict] = {}
        self._pids: dict[int, int] | None = None

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t└──> FedGRPO (reward-only: probe -> score -> server GRPO update):")
        log(INFO, "\t\t├── selection: %s", self.selection)
        log(INFO, "\t\t├── experts per prompt M: %d", self.num_experts)
        log(INFO, "\t\t├── completions per expert G: %d", self.group_size)
        log(INFO, "\t\t└── scale_rewards: %s", self.scale_rewards)

    # ------------------------------------------------------------------ pieces of a round
    def _partitions(self, protocol: Protocol) -> dict[int, int]:
        """``{partition id: node id}`` of the connected clients (queried once)."""
        if self._pids is None:
            nodes = wait_for_nodes(protocol.grid, self.min_nodes)
            mapping, _ = query_partitions(protocol.grid, nodes)
            self._pids = {pid: node for node, pid in mapping.items()}
        return self._pids

    def probe(self, protocol: Protocol, pids: dict[int, int]) -> np.ndarray:
        """The ``probe`` phase: every client scores the auxiliary answers; the graph's rows are
        :func:`agreement` with the server's reference rewards (a client that fails: row 0)."""
        aux = self.aux
        ref = [self.scorer(q, c) for q, c in zip(aux.questions, aux.completions, strict=True)]
        n = sum(len(c) for c in aux.completions)
        content = score_content(0, aux.questions, aux.completions)
        rep = protocol.exchange(
            PROBE,
            {node: content for node in pids.values()},
            message_type=SCORE_MESSAGE,
            validate=lambda m: check_rewards(m, n),
        )
        if not rep.replies:
            raise FedGRPOError(f"no valid probe reply: {rep.failures}")
        item_domains = [d for d, c in zip(aux.domains, aux.completions, strict=True) for _ in c]
        flat_ref = np.concatenate(ref)
        graph = np.zeros((max(pids) + 1, aux.num_domains))
        node_pid = {node: pid for pid, node in pids.items()}
        for node, msg in rep.by_node().items():
            graph[node_pid[node]] = agreement(
                msg.content[REWARDS_KEY][REWARD_LIST],
                flat_ref,
                item_domains,
                aux.num_domains,
                self.reward_range,
            )
        return graph

    def experts(self, question: str, server_round: int, index: int, pids: Sequence[int]) -> list:
        """The partition ids scoring ``question`` (the ``index``-th prompt of the round)."""
        pids = sorted(pids)
        if self.selection == "graph":
            d = nearest_domain(question, self.aux.questions, self.aux.domains)
            rows = self.graph[pids]
            return [pids[i] for i in top_experts(rows, d, self.num_experts)]
        seed = derive_seed(self.seed, server_round, index, 0xE4)
        return [pids[i] for i in random_experts(len(pids), self.num_experts, seed)]

    # ------------------------------------------------------------------ the round
    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """Select, generate, score, update (see the module docstring).

        Raises
        ------
        FedGRPOError
            If fewer clients are connected than experts per prompt, or no probe reply is valid.
        """
        questions = list(self.prompts(server_round))
        m, g = self.num_experts, self.group_size
        gen_seed = derive_seed(self.seed, server_round, 0x6E)
        completions = self.policy.generate(questions, m * g, gen_seed)
        # groups[p] = list of (expert pid or None, completions, rewards)
        rewards: list[list[np.ndarray]] = [[] for _ in questions]
        kept: list[list[str]] = [[] for _ in questions]
        row: dict = {"prompts": len(questions), "groups_dropped": 0}
        if self.selection == "central":
            protocol.round_row(server_round)
            for p, q in enumerate(questions):
                rewards[p].append(np.asarray(self.scorer(q, completions[p]), dtype=np.float64))
                kept[p].extend(completions[p])
        else:
            pids = self._partitions(protocol)
            if len(pids) < m:
                raise FedGRPOError(f"{len(pids)} client(s) connected, {m} experts per prompt")
            if self.selection == "graph" and self.graph is None:
                self.graph = self.probe(protocol, pids)
                row["graph"] = [[round(float(v), 4) for v in r] for r in self.graph]
            plan: dict[int, list[tuple[int, int]]] = {}  # pid -> [(prompt, group index)]
            for p, q in enumerate(questions):
                for j, pid in enumerate(self.experts(q, server_round, p, list(pids))):
                    plan.setdefault(pid, []).append((p, j))
            contents, expected = {}, {}
            for pid, groups in plan.items():
                qs = [questions[p] for p, _ in groups]
                cs = [completions[p][j * g : (j + 1) * g] for p, j in groups]
                contents[pids[pid]] = score_content(server_round, qs, cs)
                expected[pids[pid]] = len(groups) * g
            rep = protocol.exchange(
                SCORE,
                contents,
                message_type=SCORE_MESSAGE,
                validate=lambda msg: check_rewards(msg, expected[msg.metadata.src_node_id]),
            )
            got = rep.by_node()
            for pid, groups in sorted(plan.items()):
                msg = got.get(pids[pid])
                if msg is None:
                    row["groups_dropped"] += len(groups)
                    continue
                r = np.asarray(msg.content[REWARDS_KEY][REWARD_LIST], dtype=np.float64)
                for k, (p, j) in enumerate(groups):
                    rewards[p].append(r[k * g : (k + 1) * g])
                    kept[p].extend(completions[p][j * g : (j + 1) * g])
            for node, why in sorted(rep.failures.items()):
                log(
                    WARNING,
                    "[fedgrpo] round %d: node %d's rewards left out: %s",
                    server_round,
                    node,
                    why,
                )
            row["bytes_up_per_prompt"] = rep.bytes_received / max(len(questions), 1)
            row["bytes_down_per_prompt"] = rep.bytes_sent / max(len(questions), 1)
        row["floats_up_per_prompt"] = 0 if self.selection == "central" else m * g
        flat = [np.concatenate(r) if r else np.zeros(0) for r in rewards]
        use = [p for p in range(len(questions)) if flat[p].size >= 2]
        advantages = [group_advantages(flat[p], self.scale_rewards) for p in use]
        if self.scorer is not None:  # harness: how far the received rewards are from the exact
            err = [np.abs(flat[p] - self.scorer(questions[p], kept[p])).mean() for p in use]
            row["reward_error"] = float(np.mean(err)) if err else float("nan")
        stats = {}
        if use:
            stats = self.policy.update(
                [questions[p] for p in use],
                [kept[p] for p in use],
                advantages,
                derive_seed(self.seed, server_round, 0x0D),
            )
        all_r = np.concatenate([flat[p] for p in use]) if use else np.zeros(0)
        row.update(
            prompts_used=len(use),
            reward_mean=float(all_r.mean()) if all_r.size else float("nan"),
            **{k: float(v) for k, v in stats.items()},
        )
        self.history[server_round] = row
        metrics = {
            "reward-mean": row["reward_mean"],
            "prompts-used": len(use),
            "num-examples": int(all_r.size),
        }
        return RoundOutcome(arrays=self.policy.arrays(), train_metrics=MetricRecord(metrics))
