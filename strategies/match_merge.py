"""Match-and-merge: heterogeneous language models for federated N-best rescoring (GMMA / RMMA).

Hong, Gu, Jiang, Gu, Zhang, Wang and Su, "Federated Heterogeneous Language Model Optimization for
Hybrid Automatic Speech Recognition", ICASSP 2026, arXiv:2603.04945. No code is public and only the
abstract and introduction were available, so everything concrete below is a RECONSTRUCTION except
what the abstract states: clients hold heterogeneous LMs (n-gram and neural) that cannot be
parameter-averaged; a *match-and-merge* search decides which LMs are combined and how; GMMA evolves
the pairings with genetic operators, RMMA chooses them with reinforcement learning; CER is the
metric.

Pieces (all numpy, no Flower, no LM code: an LM enters as a table of per-character
log-probabilities of every hypothesis, ``(utterances, N, T)``):

- :func:`edit_distance`, :func:`cer`: Levenshtein distance on characters, CER = edits / reference
  characters (corpus-level, per domain);
- :func:`rescore`: ``score(h) = am(h) + alpha * lm(h) + beta * |h|``, the argmax per utterance;
- :class:`Candidate` and :func:`merge_tables`: a *matching* is a chain of pairwise merges over a
  subset of the LMs in an order; each step merges the model built so far (weight ``w``) with the
  next LM (``1 - w``): per-token **linear interpolation** while every model merged so far is an
  n-gram (same type), **log-linear** (score-level) combination as soon as a neural LM is in;
  :func:`effective_weights` gives the resulting weights on the simplex; :func:`uniform_lm` is the
  uniform interpolation of all LMs (baseline);
- :class:`Evaluations`: the fitness (dev CER) with a cache, counting distinct evaluations and the
  best value after each one (:meth:`Evaluations.to_converge`);
- :func:`gmma`: population, tournament selection, order crossover of the matching and blend
  crossover of the weights, mutation (swap two LMs, change the length, perturb a weight), elite;
- :func:`rmma`: a REINFORCE policy over (pair, weight) actions: first LM, then the next LM to merge
  with the current model (or stop) and its weight on a grid; reward = dev-CER reduction (in
  points), a moving-average baseline per step;
- :class:`MatchMerge`: the Flower side, one round of a :class:`PhasedStrategy`: ``upload`` (every
  client trains its own LM and sends it; :func:`check_lm_reply` rejects a malformed reply with a
  named reason), then the server search on the dev N-best lists and the test CER per domain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from flowerbed.common.protocol import PhasedStrategy, Protocol, RoundOutcome, wait_for_nodes
from flowerbed.common.seeding import derive_seed

UPLOAD = "upload"
LM_KEY = "lm"  # the ArrayRecord of an upload reply
META_KEY = "metrics"  # its MetricRecord: partition-id, lm-kind, ...
KINDS = ("ngram", "neural")
WEIGHT_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))  # RMMA's weight actions
SEARCHES = ("gmma", "rmma", "am-only", "best-single", "uniform")


class MatchMergeError(RuntimeError):
    """A round that cannot run (no valid LM uploaded, inconsistent N-best tables)."""


# ---------------------------------------------------------------------------- CER
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (unit cost substitution, deletion, insertion).

    One numpy row per character of ``a``; the insertion chain of a row is a running minimum:
    ``d[j] = min_k<=j (e[k] + j - k)`` with ``e`` the deletion/substitution candidates.
    """
    if not a:
        return len(b)
    if not b:
        return len(a)
    bb = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    idx = np.arange(len(b) + 1)
    prev = idx.copy()
    for i in range(1, len(a) + 1):
        cost = (bb != ord(a[i - 1])).astype(np.int64)
        e = np.empty_like(prev)
        e[0] = i
        e[1:] = np.minimum(prev[1:] + 1, prev[:-1] + cost)
        prev = np.minimum.accumulate(e - idx) + idx
    return int(prev[-1])


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus-level character error rate: ``sum edit_distance(ref, hyp) / sum len(ref)``."""
    if len(refs) != len(hyps):
        raise ValueError(f"cer: {len(refs)} references, {len(hyps)} hypotheses")
    chars = sum(len(r) for r in refs)
    if chars == 0:
        raise ValueError("cer: empty references")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True)) / chars


# ---------------------------------------------------------------------------- N-best lists
@dataclass
class NBestSet:
    """N-best lists of a set of utterances, padded to ``N`` hypotheses.

    Attributes
    ----------
    refs : list of str
        Reference transcript of each utterance.
    hyps : list of list of str
        Hypotheses of each utterance (at most ``N``, at least one).
    am : ndarray (U, N)
        Acoustic log-score of each hypothesis; ``-inf`` pads a list shorter than ``N``.
    domains : ndarray (U,)
        Domain index of each utterance.
    domain_names : tuple of str
        Name of each domain index.
    """

    refs: list[str]
    hyps: list[list[str]]
    am: np.ndarray
    domains: np.ndarray
    domain_names: tuple[str, ...]

    def __post_init__(self) -> None:
        u = len(self.refs)
        self.am = np.asarray(self.am, dtype=np.float64)
        self.domains = np.asarray(self.domains, dtype=np.int64)
        if self.am.ndim != 2 or self.am.shape[0] != u or len(self.hyps) != u:
            raise ValueError("NBestSet: refs, hyps and am disagree on the number of utterances")
        if any(not 1 <= len(h) <= self.am.shape[1] for h in self.hyps):
            raise ValueError("NBestSet: every utterance needs 1..N hypotheses")
        n = self.am.shape[1]
        self.valid = np.array([[j < len(h) for j in range(n)] for h in self.hyps], dtype=bool)
        self.edits = np.zeros(self.am.shape, dtype=np.int64)
        self.lengths = np.zeros(self.am.shape, dtype=np.float64)
        for i, (ref, hs) in enumerate(zip(self.refs, self.hyps, strict=True)):
            for j, h in enumerate(hs):
                self.edits[i, j] = edit_distance(ref, h)
                self.lengths[i, j] = len(h)
        self.ref_chars = np.array([len(r) for r in self.refs], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def n(self) -> int:
        return int(self.am.shape[1])

    def flat_hyps(self) -> list[str]:
        """All hypotheses, utterance by utterance, padded with ``""`` to ``N`` each."""
        return [h for hs in self.hyps for h in (list(hs) + [""] * (self.n - len(hs)))]

    def cer_of(self, choice: np.ndarray) -> dict[str, float]:
        """CER of choosing hypothesis ``choice[u]`` of each utterance: ``{"all": ...}`` and one
        entry per domain name present."""
        e = self.edits[np.arange(len(self)), choice].astype(np.float64)
        out = {"all": float(e.sum() / self.ref_chars.sum())}
        for d, name in enumerate(self.domain_names):
            sel = self.domains == d
            if sel.any():
                out[name] = float(e[sel].sum() / self.ref_chars[sel].sum())
        return out

    def oracle(self) -> dict[str, float]:
        """CER of the best hypothesis of every list (the floor of any rescoring)."""
        e = np.where(self.valid, self.edits, np.iinfo(np.int64).max)
        return self.cer_of(e.argmin(axis=1))


def rescore(
    am: np.ndarray, lm: np.ndarray, lengths: np.ndarray, alpha: float, beta: float
) -> np.ndarray:
    """Index of the best hypothesis per utterance, ``argmax am + alpha * lm + beta * |h|``.

    ``am``, ``lm``, ``lengths`` are ``(U, N)``; padding has ``am = -inf`` and is never chosen
    (first index on ties).
    """
    score = np.asarray(am, dtype=np.float64) + alpha * lm + beta * lengths
    return np.argmax(score, axis=1)


# ---------------------------------------------------------------------------- merges
@dataclass(frozen=True)
class Candidate:
    """A matching and its merge weights: LMs ``order[0], order[1], ...`` merged in a chain.

    Step ``t`` merges the model built so far (weight ``weights[t-1]``) with LM ``order[t]``
    (weight ``1 - weights[t-1]``). An empty ``order`` is the acoustic model alone.
    """

    order: tuple[int, ...]
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.weights) != max(len(self.order) - 1, 0):
            raise ValueError("Candidate: one weight per merge step (len(order) - 1)")
        if len(set(self.order)) != len(self.order):
            raise ValueError("Candidate: an LM appears twice in the matching")
        if any(not 0.0 <= w <= 1.0 for w in self.weights):
            raise ValueError("Candidate: weights in [0, 1]")

    def key(self) -> tuple:
        return (self.order, tuple(round(float(w), 6) for w in self.weights))


def effective_weights(cand: Candidate, num_lms: int) -> np.ndarray:
    """The weight of each LM in the merged model (a point of the simplex when the candidate uses
    at least one LM; all zeros for the acoustic model alone)."""
    w = np.zeros(num_lms)
    if not cand.order:
        return w
    w[cand.order[0]] = 1.0
    for lm, step in zip(cand.order[1:], cand.weights, strict=True):
        w *= step
        w[lm] = 1.0 - step
    return w


def merge_tables(tables: np.ndarray, kinds: Sequence[str], cand: Candidate) -> np.ndarray:
    """Per-token log-probabilities of the merged LM, ``(U, N, T)``.

    ``tables[k]`` holds LM ``k``'s per-character log-probabilities (0 on padding). While all
    merged LMs are n-grams the merge is the per-token linear interpolation
    ``log(w p_m + (1 - w) p_k)``; once a neural LM is in, the log-linear combination
    ``w log p_m + (1 - w) log p_k`` (score level: heterogeneous models).
    """
    if not cand.order:
        return np.zeros(tables.shape[1:])
    first = cand.order[0]
    merged = tables[first]
    same_type = kinds[first] == "ngram"
    for k, w in zip(cand.order[1:], cand.weights, strict=True):
        same_type = same_type and kinds[k] == "ngram"
        if same_type:
            with np.errstate(divide="ignore"):
                merged = np.logaddexp(np.log(w) + merged, np.log1p(-w) + tables[k])
        else:
            merged = w * merged + (1.0 - w) * tables[k]
    return merged


def uniform_lm(tables: np.ndarray) -> np.ndarray:
    """Uniform linear interpolation of all LMs, per token: ``log (1/K) sum_k p_k``, ``(U, N, T)``.

    Every LM here is a normalised per-character distribution, so the mixture is one as well."""
    k = tables.shape[0]
    return np.logaddexp.reduce(tables, axis=0) - math.log(k)


class DevScorer:
    """The fitness of a candidate: CER of rescoring an N-best set with its merged LM.

    Parameters
    ----------
    nbest : NBestSet
        The N-best lists (dev set for the search, test set for the report).
    tables : ndarray (K, U, N, T)
        Per-character log-probabilities of every hypothesis under each of the K LMs.
    kinds : sequence of str
        ``"ngram"`` or ``"neural"`` per LM.
    alpha, beta : float
        LM weight and length bonus of :func:`rescore`.
    """

    def __init__(self, nbest: NBestSet, tables: np.ndarray, kinds, alpha: float, beta: float):
        if tables.shape[1:3] != nbest.am.shape:
            raise MatchMergeError(f"LM tables {tables.shape} do not fit N-best {nbest.am.shape}")
        self.nbest, self.tables, self.kinds = nbest, tables, list(kinds)
        self.alpha, self.beta = float(alpha), float(beta)

    def choice(self, token_lp: np.ndarray) -> np.ndarray:
        lm = token_lp.sum(axis=-1)
        return rescore(self.nbest.am, lm, self.nbest.lengths, self.alpha, self.beta)

    def cer(self, cand: Candidate) -> dict[str, float]:
        if not cand.order:  # the acoustic model alone: its 1-best, no LM and no length bonus
            return self.nbest.cer_of(rescore(self.nbest.am, 0.0, self.nbest.lengths, 0.0, 0.0))
        return self.nbest.cer_of(self.choice(merge_tables(self.tables, self.kinds, cand)))

    def cer_uniform(self) -> dict[str, float]:
        return self.nbest.cer_of(self.choice(uniform_lm(self.tables)))

    def __call__(self, cand: Candidate) -> float:
        return self.cer(cand)["all"]


# ---------------------------------------------------------------------------- evaluations
class Evaluations:
    """A fitness function (lower is better) that counts distinct evaluations.

    A candidate seen before is answered from the cache and not counted again. ``best`` is the
    best value after each counted evaluation; ``budget`` (None: none) makes :attr:`exhausted`
    true once that many evaluations were made.
    """

    def __init__(self, fn: Callable[[Candidate], float], budget: int | None = None) -> None:
        self.fn = fn
        self.budget = budget
        self.cache: dict[tuple, float] = {}
        self.best: list[float] = []
        self.best_candidate: Candidate | None = None

    @property
    def count(self) -> int:
        return len(self.best)

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and self.count >= self.budget

    def __call__(self, cand: Candidate) -> float:
        key = cand.key()
        if key in self.cache:
            return self.cache[key]
        value = float(self.fn(cand))
        self.cache[key] = value
        if not self.best or value < self.best[-1]:
            self.best.append(value)
            self.best_candidate = cand
        else:
            self.best.append(self.best[-1])
        return value

    def to_converge(self, tol: float = 1e-3) -> int:
        """Evaluations until the best value first came within ``tol`` of the final best."""
        if not self.best:
            return 0
        final = self.best[-1]
        return next(i + 1 for i, v in enumerate(self.best) if v <= final + tol)


# ---------------------------------------------------------------------------- GMMA
@dataclass(frozen=True)
class Genome:
    """GMMA's chromosome: a permutation of all LMs, how many of them are merged, K-1 weights."""

    perm: tuple[int, ...]
    length: int
    weights: tuple[float, ...]

    def candidate(self) -> Candidate:
        return Candidate(self.perm[: self.length], self.weights[: self.length - 1])


def _quantise(w: float) -> float:
    return round(min(max(float(w), 0.05), 0.95), 2)


def random_genome(k: int, rng: np.random.Generator) -> Genome:
    perm = tuple(int(i) for i in rng.permutation(k))
    weights = tuple(_quantise(w) for w in rng.uniform(0.05, 0.95, size=k - 1))
    return Genome(perm, int(rng.integers(1, k + 1)), weights)


def tournament(fit: Sequence[float], size: int, rng: np.random.Generator) -> int:
    """Index of the fittest (lowest) of ``size`` individuals drawn without replacement."""
    entrants = rng.choice(len(fit), size=min(size, len(fit)), replace=False)
    return int(min(entrants, key=lambda i: (fit[i], i)))


def order_crossover(a: Sequence[int], b: Sequence[int], rng: np.random.Generator) -> tuple:
    """OX1: a slice of ``a`` kept in place, the other positions filled in ``b``'s order."""
    k = len(a)
    i, j = sorted(int(x) for x in rng.choice(k + 1, size=2, replace=False))
    child: list[int | None] = [None] * k
    child[i:j] = a[i:j]
    rest = [g for g in b if g not in child[i:j]]
    for pos in range(k):
        if child[pos] is None:
            child[pos] = rest.pop(0)
    return tuple(int(g) for g in child)


def crossover(a: Genome, b: Genome, rng: np.random.Generator) -> Genome:
    """Order crossover of the matching, the length of either parent, blend of the weights."""
    perm = order_crossover(a.perm, b.perm, rng)
    length = a.length if rng.random() < 0.5 else b.length
    u = rng.uniform(size=len(a.weights))
    weights = tuple(
        _quantise(x * wa + (1 - x) * wb) for x, wa, wb in zip(u, a.weights, b.weights, strict=True)
    )
    return Genome(perm, length, weights)


def mutate(g: Genome, rate: float, rng: np.random.Generator, sigma: float = 0.15) -> Genome:
    """With probability ``rate`` each: swap two LMs, change the length by one, and (per weight)
    add Gaussian noise of std ``sigma``."""
    perm, length, weights = list(g.perm), g.length, list(g.weights)
    k = len(perm)
    if k > 1 and rng.random() < rate:
        i, j = rng.choice(k, size=2, replace=False)
        perm[i], perm[j] = perm[j], perm[i]
    if rng.random() < rate:
        length = int(min(max(length + (1 if rng.random() < 0.5 else -1), 1), k))
    for t in range(len(weights)):
        if rng.random() < rate:
            weights[t] = _quantise(weights[t] + rng.normal(0.0, sigma))
    return Genome(tuple(perm), length, tuple(weights))


def gmma(
    fitness: Evaluations,
    num_lms: int,
    seed: int,
    population: int = 20,
    generations: int = 30,
    tournament_size: int = 3,
    mutation_rate: float = 0.2,
    elite: int = 2,
) -> Candidate:
    """GMMA (Reconstruction): evolve matchings and weights; return the best candidate evaluated.

    Each generation evaluates the population, keeps the ``elite`` best, and fills the rest with
    children of two tournament winners (:func:`crossover`, :func:`mutate`). The search stops
    after ``generations`` generations or when ``fitness``'s budget is spent.
    """
    rng = np.random.default_rng(seed)
    pop = [random_genome(num_lms, rng) for _ in range(population)]
    for _ in range(generations):
        fit = []
        for g in pop:
            if fitness.exhausted and g.candidate().key() not in fitness.cache:
                break
            fit.append(fitness(g.candidate()))
        if len(fit) < len(pop) or fitness.exhausted:
            break
        ranked = sorted(range(len(pop)), key=lambda i: (fit[i], i))
        nxt = [pop[i] for i in ranked[:elite]]
        while len(nxt) < population:
            a = pop[tournament(fit, tournament_size, rng)]
            b = pop[tournament(fit, tournament_size, rng)]
            nxt.append(mutate(crossover(a, b, rng), mutation_rate, rng))
        pop = nxt
    if fitness.best_candidate is None:
        raise MatchMergeError("gmma: no candidate evaluated")
    return fitness.best_candidate


# ---------------------------------------------------------------------------- RMMA
def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z[np.isfinite(z)].max()
    e = np.exp(z)
    return e / e.sum()


def _sample(logits: np.ndarray, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """An index drawn from ``softmax(logits)`` (``-inf``: masked) and the gradient of its
    log-probability with respect to the logits (``onehot - p``, 0 on masked entries)."""
    p = _softmax(logits)
    a = int(rng.choice(len(p), p=p))
    grad = -p
    grad[a] += 1.0
    return a, grad


class RMMAPolicy:
    """RMMA's policy (Reconstruction): preferences for the first LM, for the next LM given the
    last one merged (a pair; column K = stop), and for the weight of each incoming LM."""

    def __init__(self, k: int, grid: Sequence[float] = WEIGHT_GRID) -> None:
        self.k = k
        self.grid = tuple(grid)
        self.first = np.zeros(k)
        self.pair = np.zeros((k, k + 1))
        self.weight = np.zeros((k, len(self.grid)))


def rmma(
    fitness: Evaluations,
    num_lms: int,
    seed: int,
    episodes: int = 200,
    lr: float = 0.05,
    baseline_decay: float = 0.9,
    am_only: float | None = None,
    grid: Sequence[float] = WEIGHT_GRID,
    reward_scale: float = 100.0,
) -> Candidate:
    """RMMA (Reconstruction): REINFORCE over (pair, weight) actions; best candidate evaluated.

    An episode starts from the acoustic model alone and picks a first LM, then repeatedly the
    next LM to merge with the current model (or stop) and the weight (on ``grid``) of the model
    built so far. Each step's reward is the dev-CER reduction in points (``reward_scale`` x
    CER), the return
    of a step is the sum of its own and later rewards, and each step's baseline is a moving
    average of the returns seen at that step (``baseline_decay``). The search stops after
    ``episodes`` episodes or when ``fitness``'s budget is spent.

    Parameters
    ----------
    am_only : float or None
        Dev CER of the acoustic model alone (the start state); None evaluates it once.
    """
    rng = np.random.default_rng(seed)
    pol = RMMAPolicy(num_lms, grid)
    start = fitness(Candidate(())) if am_only is None else float(am_only)
    baselines = np.zeros(num_lms + 1)  # one per decision step (first, then pairs)
    seen = np.zeros(num_lms + 1, dtype=bool)
    for _ in range(episodes):
        if fitness.exhausted:
            break
        steps: list[tuple[str, int, np.ndarray]] = []  # (table, row, grad of log-prob)
        rewards: list[float] = []
        a, g = _sample(pol.first, rng)
        steps.append(("first", -1, g))
        order, weights = [a], []
        prev = start
        value = fitness(Candidate(tuple(order)))
        rewards.append(reward_scale * (prev - value))
        prev = value
        while len(order) < num_lms and not fitness.exhausted:
            logits = pol.pair[order[-1]].copy()
            logits[list(order)] = -np.inf
            nxt, g = _sample(logits, rng)
            steps.append(("pair", order[-1], g))
            if nxt == num_lms:  # stop
                rewards.append(0.0)
                break
            wi, gw = _sample(pol.weight[nxt], rng)
            steps.append(("weight", nxt, gw))
            order.append(nxt)
            weights.append(pol.grid[wi])
            value = fitness(Candidate(tuple(order), tuple(weights)))
            rewards.append(reward_scale * (prev - value))
            prev = value
        # returns per decision step: a weight step shares the reward of its pair step
        per_step, r_idx = [], 0
        for name, *_ in steps:
            if name == "weight":
                per_step.append(r_idx - 1)
            else:
                per_step.append(r_idx)
                r_idx += 1
        cum = np.cumsum(np.asarray(rewards)[::-1])[::-1]
        for (name, row, grad), t in zip(steps, per_step, strict=True):
            adv = cum[t] - baselines[t] if seen[t] else cum[t]
            if name == "first":
                pol.first += lr * adv * grad
            elif name == "pair":
                pol.pair[row] += lr * adv * grad
            else:
                pol.weight[row] += lr * adv * grad
        for t in sorted(set(per_step)):
            baselines[t] = (
                baseline_decay * baselines[t] + (1 - baseline_decay) * cum[t] if seen[t] else cum[t]
            )
            seen[t] = True
    if fitness.best_candidate is None:
        raise MatchMergeError("rmma: no candidate evaluated")
    return fitness.best_candidate


# ---------------------------------------------------------------------------- replies
def check_lm_reply(msg: Message) -> str | None:
    """Why an upload reply must be rejected (None: its records are well-formed): an ArrayRecord
    ``lm`` with finite arrays, a MetricRecord ``metrics`` with ``partition-id`` and ``lm-kind``
    (0 n-gram, 1 neural). The LM's own shapes are checked by the app's loader."""
    content = msg.content
    if LM_KEY not in content.array_records:
        return f"no ArrayRecord {LM_KEY!r}"
    if META_KEY not in content.metric_records:
        return f"no MetricRecord {META_KEY!r}"
    meta = content[META_KEY]
    for key in ("partition-id", "lm-kind"):
        if key not in meta:
            return f"metric {key!r} missing"
    if int(meta["lm-kind"]) not in (0, 1):
        return f"lm-kind {meta['lm-kind']!r} is not 0 (n-gram) or 1 (neural)"
    if len(content[LM_KEY]) == 0:
        return "empty LM"
    for name, arr in content[LM_KEY].items():
        a = arr.numpy()
        if a.size and np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            return f"array {name!r} is not finite"
    return None


# ---------------------------------------------------------------------------- the strategy
#: ``load(arrays, metrics) -> lm``: the app's loader; raises ValueError with the reason when the
#: arrays do not describe a valid LM. ``lm.table(texts, T)`` gives ``(len(texts), T)`` per-character
#: log-probabilities (0 on padding).
LMLoader = Callable[[ArrayRecord, MetricRecord], Any]


class MatchMerge(PhasedStrategy):
    """One round: the clients upload their LMs, the server matches and merges them.

    Parameters
    ----------
    search : str
        ``gmma``, ``rmma`` (the paper's methods), ``am-only`` (no LM), ``best-single`` (the LM
        with the lowest dev CER) or ``uniform`` (uniform interpolation of all LMs).
    load_lm : LMLoader
        The app's loader of an uploaded LM.
    dev, test : NBestSet
        The server's dev N-best lists (the search's fitness) and test lists (the report).
    alpha, beta : float
        Rescoring weights of :func:`rescore`.
    seed : int
        Run seed; the search is seeded by (seed, round).
    min_nodes : int, default 1
        Nodes to wait for before the upload.
    budget : int, default 600
        Most fitness evaluations of a search (GMMA stops earlier after its generations).
    gmma_kwargs, rmma_kwargs : dict or None
        Hyper-parameters of :func:`gmma` / :func:`rmma`.
    tol : float, default 1e-3
        Convergence tolerance on the dev CER (:meth:`Evaluations.to_converge`).

    Attributes
    ----------
    history : dict of int to dict
        Per round: uploads kept and rejected, the LMs (partition, kind), the chosen matching and
        weights, evaluations, dev and test CER.
    """

    def __init__(
        self,
        search: str,
        load_lm: LMLoader,
        dev: NBestSet,
        test: NBestSet,
        alpha: float,
        beta: float,
        seed: int = 0,
        min_nodes: int = 1,
        budget: int = 600,
        gmma_kwargs: dict | None = None,
        rmma_kwargs: dict | None = None,
        tol: float = 1e-3,
    ) -> None:
        if search not in SEARCHES:
            raise ValueError(f"search {search!r}: one of {', '.join(SEARCHES)}")
        self.search = search
        self.load_lm = load_lm
        self.dev, self.test = dev, test
        self.alpha, self.beta = float(alpha), float(beta)
        self.seed = int(seed)
        self.min_nodes = int(min_nodes)
        self.budget = int(budget)
        self.gmma_kwargs = dict(gmma_kwargs or {})
        self.rmma_kwargs = dict(rmma_kwargs or {})
        self.tol = float(tol)
        self.history: dict[int, dict] = {}

    def summary(self) -> None:
        log(INFO, "\t└──> MatchMerge (upload LMs -> server match-and-merge on dev N-best):")
        log(INFO, "\t\t├── search: %s (budget %d evaluations)", self.search, self.budget)
        log(INFO, "\t\t└── alpha %.3g, beta %.3g", self.alpha, self.beta)

    # ------------------------------------------------------------------ pieces
    def collect(self, protocol: Protocol, server_round: int) -> tuple[list, list[int], dict]:
        """The ``upload`` phase: ``(lms, partition ids, failures)``, LMs sorted by partition."""
        nodes = wait_for_nodes(protocol.grid, self.min_nodes)
        loaded: dict[int, Any] = {}

        def validate(msg: Message) -> str | None:
            why = check_lm_reply(msg)
            if why is not None:
                return why
            try:
                loaded[msg.metadata.src_node_id] = self.load_lm(
                    msg.content[LM_KEY], msg.content[META_KEY]
                )
            except ValueError as e:
                return f"malformed LM: {e}"
            return None

        content = RecordDict({"config": ConfigRecord({"server-round": int(server_round)})})
        rep = protocol.broadcast(UPLOAD, content, nodes, validate=validate)
        by_pid: dict[int, tuple[int, Any]] = {}
        for node, msg in rep.by_node().items():
            pid = int(msg.content[META_KEY]["partition-id"])
            if pid in by_pid:
                rep.failures[node] = f"rejected, partition {pid} uploaded twice"
                continue
            by_pid[pid] = (node, loaded[node])
        for node, why in sorted(rep.failures.items()):
            log(WARNING, "[match-merge] round %d: node %d left out: %s", server_round, node, why)
        pids = sorted(by_pid)
        return [by_pid[p][1] for p in pids], pids, dict(rep.failures)

    @staticmethod
    def tables(lms: Sequence[Any], nbest: NBestSet) -> np.ndarray:
        """``(K, U, N, T)`` per-character log-probabilities of every hypothesis under each LM."""
        texts = nbest.flat_hyps()
        t = max(len(h) for h in texts) + 1  # + end of sentence
        out = np.stack([np.asarray(lm.table(texts, t), dtype=np.float64) for lm in lms])
        return out.reshape(len(lms), len(nbest), nbest.n, t)

    def choose(self, dev: DevScorer, num_lms: int, server_round: int) -> tuple[Any, Evaluations]:
        """The search: a Candidate (or ``"uniform"``) and its :class:`Evaluations`."""
        evals = Evaluations(dev, budget=self.budget)
        seed = derive_seed(self.seed, server_round, 0x3A)
        if self.search == "am-only":
            return Candidate(()), evals
        if self.search == "uniform":
            return "uniform", evals
        if self.search == "best-single":
            scores = [evals(Candidate((k,))) for k in range(num_lms)]
            return Candidate((int(np.argmin(scores)),)), evals
        if self.search == "gmma":
            return gmma(evals, num_lms, seed, **self.gmma_kwargs), evals
        return rmma(evals, num_lms, seed, **self.rmma_kwargs), evals

    # ------------------------------------------------------------------ the round
    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """Upload, search on dev, report test CER per domain (module docstring)."""
        lms, pids, failures = self.collect(protocol, server_round)
        if not lms:
            raise MatchMergeError(f"no valid LM uploaded: {failures}")
        kinds = [lm.kind for lm in lms]
        dev = DevScorer(self.dev, self.tables(lms, self.dev), kinds, self.alpha, self.beta)
        test = DevScorer(self.test, self.tables(lms, self.test), kinds, self.alpha, self.beta)
        best, evals = self.choose(dev, len(lms), server_round)
        if best == "uniform":
            dev_cer, test_cer = dev.cer_uniform(), test.cer_uniform()
            weights = np.full(len(lms), 1.0 / len(lms))
            order, steps = list(range(len(lms))), []
        else:
            dev_cer, test_cer = dev.cer(best), test.cer(best)
            weights = effective_weights(best, len(lms))
            order, steps = list(best.order), list(best.weights)
        row = {
            "lms": [
                {"partition": p, "kind": lm.kind, "name": lm.name}
                for p, lm in zip(pids, lms, strict=True)
            ],
            "uploads_kept": len(lms),
            "uploads_rejected": len(failures),
            "matching": [pids[k] for k in order],
            "merge_weights": [float(w) for w in steps],
            "effective_weights": {str(p): float(w) for p, w in zip(pids, weights, strict=True)},
            "evaluations": evals.count,
            "evals_to_converge": evals.to_converge(self.tol),
            "dev_best_curve": [round(v, 6) for v in evals.best],
            "dev_cer": dev_cer,
            "test_cer": test_cer,
            "test_oracle_cer": self.test.oracle(),
        }
        self.history[server_round] = row
        metrics = {
            "cer": test_cer["all"],
            "dev-cer": dev_cer["all"],
            "evaluations": evals.count,
            "evals-to-converge": evals.to_converge(self.tol),
            **{f"cer-{name}": v for name, v in test_cer.items() if name != "all"},
        }
        arrays_out = ArrayRecord({"weights": Array(np.asarray(weights, dtype=np.float64))})
        return RoundOutcome(arrays=arrays_out, server_metrics=MetricRecord(metrics))
