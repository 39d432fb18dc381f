"""Byzantine attacks for every FedAvg-shaped app, chosen by run config (the ``ATTACK`` fragment).

Model poisoning (what a malicious client sends instead of its update ``g``; ``mu``, ``sigma`` are
the coordinate-wise mean and standard deviation of the reference updates, see *collusion*):

- ``sign-flip``: ``-scale * g`` (its own update, reversed and scaled);
- ``gaussian``: ``N(0, scale^2)`` noise in every coordinate, drawn from (seed, round, partition);
- ``lie`` ("a little is enough", Baruch et al., NeurIPS 2019): ``mu - z * sigma`` with
  ``s = floor(n / 2 + 1) - m`` and ``z = Phi^-1((n - s) / n)`` for ``n`` clients of which ``m``
  are malicious (``z`` at least 0);
- ``min-max`` / ``min-sum`` (Shejwalkar & Houmansadr, NDSS 2021, AGR-agnostic): ``mu + gamma *
  p`` with ``p = -sigma`` (``attack-direction = std``) or ``-mu / ||mu||`` (``unit``), and the
  largest ``gamma`` found by their bisection such that the malicious update's largest distance
  (min-max), resp. its sum of squared distances (min-sum), to the reference updates stays at or
  below the largest one between two reference updates (resp. the largest sum of one of them);
- ``ipm`` (inner-product manipulation, Xie et al., UAI 2019): ``-scale * mu``.

Data poisoning: ``label-flip``: the malicious ClientApps train on ``C - 1 - y``
(:func:`flip_labels`, called by the app's client step).

*Collusion* (``attack-collude = true``, the setting of LIE / min-max / min-sum / IPM): the
reference updates are the benign updates of the round (the attackers see them); with ``false``
the attackers only know their own genuine updates and use those.

In simulation the model-poisoning attacks are applied on the server side by :class:`Attacked`, a
strategy wrapper that replaces the malicious clients' replies in ``aggregate_train`` before the
inner (defending) strategy sees them; it works around Flower's strategies as well as flowerbed's.
Which partitions are malicious: ``attack-partitions`` (ids), else ``floor(attack-fraction * n)``
chosen ``first``, ``last`` or ``random`` (by the run seed). The malicious partition and node ids
are recorded per round in ``results.json``, with the detection precision and recall of a defence
that reports the nodes it rejected (``rejected_nodes`` in its history row).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO
from statistics import NormalDist
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flowerbed.common.seeding import derive_seed

MODEL_ATTACKS = ("sign-flip", "gaussian", "lie", "min-max", "min-sum", "ipm")
ATTACKS = ("none", "label-flip", *MODEL_ATTACKS)
SELECTIONS = ("first", "last", "random")
DIRECTIONS = ("std", "unit")


class AttackError(ValueError):
    """An attack that cannot be computed (no reference update, unknown attack)."""


# ---------------------------------------------------------------------------- the attacks
def sign_flip(own: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``-scale * own``."""
    return -scale * own


def gaussian(shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise ``N(0, std^2)`` of ``shape``."""
    return rng.normal(0.0, std, size=shape)


def lie_z(n: int, m: int) -> float:
    """Baruch et al.'s ``z_max``: ``s = floor(n/2 + 1) - m``, ``z = Phi^-1((n - s) / n)``, >= 0."""
    s = math.floor(n / 2 + 1) - m
    q = (n - s) / n
    if q <= 0.5:
        return 0.0
    if q >= 1.0:
        q = 1.0 - 1e-6
    return NormalDist().inv_cdf(q)


def lie(reference: np.ndarray, n: int, m: int) -> np.ndarray:
    """``mean - z * std`` of the reference updates (rows), ``z = lie_z(n, m)``."""
    return reference.mean(0) - lie_z(n, m) * reference.std(0)


def ipm(reference: np.ndarray, epsilon: float = 1.0) -> np.ndarray:
    """``-epsilon * mean`` of the reference updates."""
    return -epsilon * reference.mean(0)


def direction(reference: np.ndarray, kind: str = "std") -> np.ndarray:
    """Perturbation of min-max / min-sum: ``-std`` or ``-mean / ||mean||``."""
    if kind == "std":
        return -reference.std(0)
    if kind == "unit":
        mu = reference.mean(0)
        return -mu / max(float(np.linalg.norm(mu)), 1e-12)
    raise AttackError(f"attack-direction={kind!r}: must be one of {', '.join(DIRECTIONS)}")


def _sq_dists(points: np.ndarray, x: np.ndarray) -> np.ndarray:
    return ((points - x) ** 2).sum(1)


def _pairwise_sq(points: np.ndarray) -> np.ndarray:
    sq = (points**2).sum(1)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * points @ points.T, 0.0)


def largest_gamma(ok, gamma_init: float = 10.0, tol: float = 1e-5, max_iter: int = 200) -> float:
    """The largest ``gamma >= 0`` with ``ok(gamma)`` (``ok`` true up to some gamma, false after).

    Shejwalkar & Houmansadr's search: from ``gamma_init`` a success moves ``gamma`` up by the
    step, a failure down, and the step halves until it is below ``tol``. Their search cannot
    pass ``2 * gamma_init``, so the upper end is first doubled while ``ok`` holds.
    """
    hi = gamma_init
    while ok(hi) and hi < 1e12:
        hi *= 2
    gamma, step, best = hi / 2, hi / 4, 0.0
    for _ in range(max_iter):
        if ok(gamma):
            best = max(best, gamma)
            gamma += step
        else:
            gamma -= step
        step /= 2
        if step < tol:
            break
    return best


def min_max(reference: np.ndarray, kind: str = "std", gamma_init: float = 10.0) -> np.ndarray:
    """``mu + gamma p`` whose largest distance to a reference update is at most the largest
    distance between two of them (min-max)."""
    mu, p = reference.mean(0), direction(reference, kind)
    bound = _pairwise_sq(reference).max()
    gamma = largest_gamma(lambda g: _sq_dists(reference, mu + g * p).max() <= bound, gamma_init)
    return mu + gamma * p


def min_sum(reference: np.ndarray, kind: str = "std", gamma_init: float = 10.0) -> np.ndarray:
    """``mu + gamma p`` whose sum of squared distances to the reference updates is at most the
    largest such sum of one of them (min-sum)."""
    mu, p = reference.mean(0), direction(reference, kind)
    bound = _pairwise_sq(reference).sum(1).max()
    gamma = largest_gamma(lambda g: _sq_dists(reference, mu + g * p).sum() <= bound, gamma_init)
    return mu + gamma * p


def flip_labels(y, num_classes: int):
    """Label flipping: ``C - 1 - y`` (numpy array or torch tensor)."""
    return num_classes - 1 - y


def poisoned_updates(
    attack: str,
    own: np.ndarray,
    benign: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    scale: float = 1.0,
    kind: str = "std",
    collude: bool = True,
) -> np.ndarray:
    """The malicious updates (rows) of one round.

    Parameters
    ----------
    attack : str
        One of :data:`MODEL_ATTACKS`.
    own : ndarray (m, d)
        The malicious clients' genuine updates.
    benign : ndarray (b, d)
        The benign clients' updates of the round (the reference with ``collude``).
    num_clients : int
        ``n`` of the LIE formula (clients of the round).
    rng : numpy Generator
        Noise of ``gaussian``.
    scale : float, default 1.0
        Sign-flip scale, Gaussian std, IPM epsilon.
    kind : str, default "std"
        Min-max / min-sum direction.
    collude : bool, default True
        Reference = benign updates (True) or the attackers' own updates (False).
    """
    m = len(own)
    if attack == "sign-flip":
        return sign_flip(own, scale)
    if attack == "gaussian":
        return gaussian(own.shape, scale, rng)
    reference = benign if collude and len(benign) else own
    if attack == "lie":
        one = lie(reference, num_clients, m)
    elif attack == "ipm":
        one = ipm(reference, scale)
    elif attack == "min-max":
        one = min_max(reference, kind)
    elif attack == "min-sum":
        one = min_sum(reference, kind)
    else:
        raise AttackError(f"attack={attack!r}: must be one of {', '.join(MODEL_ATTACKS)}")
    return np.repeat(one[None, :], m, axis=0)


# ---------------------------------------------------------------------------- who attacks
def malicious_partitions(
    num_partitions: int, fraction: float, select: str = "first", seed: int = 0, ids: str = ""
) -> list[int]:
    """The malicious partition ids: ``ids`` (comma-separated) if given, else
    ``floor(fraction * num_partitions)`` of them, the first, the last or random by ``seed``."""
    if ids.strip():
        from flowerbed.common.faults import parse_ids

        return sorted(i for i in parse_ids(ids) if 0 <= i < num_partitions)
    k = int(math.floor(fraction * num_partitions + 1e-9))
    if select == "first":
        return list(range(k))
    if select == "last":
        return list(range(num_partitions - k, num_partitions))
    rng = np.random.default_rng(derive_seed(seed, 0xA77A))
    return sorted(int(i) for i in rng.choice(num_partitions, size=k, replace=False))


def attack_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``attack-*`` keys of a parsed run config as keyword arguments of :class:`Attacked`."""
    return {
        "attack": cfg["attack"],
        "fraction": cfg["attack-fraction"],
        "select": cfg["attack-select"],
        "ids": cfg["attack-partitions"],
        "collude": cfg["attack-collude"],
        "scale": cfg["attack-scale"],
        "kind": cfg["attack-direction"],
        "seed": cfg["seed"],
    }


def is_malicious(cfg: Mapping[str, Any], partition_id: int, num_partitions: int) -> bool:
    """Whether this partition is malicious in this run (ClientApp side, e.g. label flipping)."""
    if cfg.get("attack", "none") == "none":
        return False
    o = attack_options(cfg)
    return partition_id in malicious_partitions(
        num_partitions, o["fraction"], o["select"], o["seed"], o["ids"]
    )


def poison_labels(cfg: Mapping[str, Any], partition_id: int, num_partitions: int, y, num_classes):
    """``y``, flipped (:func:`flip_labels`) when the run's attack is ``label-flip`` and this
    partition is malicious."""
    if cfg.get("attack") == "label-flip" and is_malicious(cfg, partition_id, num_partitions):
        return flip_labels(y, num_classes)
    return y


def detection(rejected: Iterable[int], malicious: Iterable[int]) -> dict[str, float]:
    """Precision and recall of a rejected set against the known attackers (1.0 when empty)."""
    rej, mal = set(rejected), set(malicious)
    tp = len(rej & mal)
    return {
        "detect_precision": tp / len(rej) if rej else 1.0,
        "detect_recall": tp / len(mal) if mal else 1.0,
    }


# ---------------------------------------------------------------------------- the wrapper
def flatten(rec: ArrayRecord, keys: Sequence[str]) -> np.ndarray:
    """The arrays ``keys`` of ``rec`` as one float64 vector."""
    return np.concatenate([rec[k].numpy().astype(np.float64).ravel() for k in keys])


def unflatten(vec: np.ndarray, like: ArrayRecord, keys: Sequence[str]) -> ArrayRecord:
    """:func:`flatten` undone: ``vec`` cut into the shapes and dtypes of ``like``."""
    out, i = {}, 0
    for k in keys:
        a = like[k].numpy()
        out[k] = Array(vec[i : i + a.size].reshape(a.shape).astype(a.dtype))
        i += a.size
    return ArrayRecord(out)


class Attacked(Strategy):
    """``strategy`` under attack: the malicious clients' train replies are replaced (model
    poisoning) before ``strategy`` aggregates them.

    Parameters
    ----------
    strategy : Strategy
        The defending strategy (Flower's or flowerbed's).
    attack : str
        One of :data:`ATTACKS` (``none`` and ``label-flip`` leave the replies as they are).
    fraction, select, ids, seed
        Which partitions are malicious (:func:`malicious_partitions`).
    collude : bool, default True
        The attackers see the benign updates of the round.
    scale : float, default 1.0
        Sign-flip scale, Gaussian std, IPM epsilon.
    kind : str, default "std"
        Min-max / min-sum direction.
    arrayrecord_key : str, default "arrays"
        Key of the model in the replies.

    The node -> partition map comes from the ``query`` handler of the ClientApps
    (:func:`flowerbed.common.client.add_partition_query`), asked once.
    """

    def __init__(
        self,
        strategy: Strategy,
        attack: str,
        fraction: float = 0.0,
        select: str = "first",
        ids: str = "",
        seed: int = 0,
        collude: bool = True,
        scale: float = 1.0,
        kind: str = "std",
        arrayrecord_key: str = "arrays",
    ) -> None:
        if attack not in ATTACKS:
            raise AttackError(f"attack={attack!r}: must be one of {', '.join(ATTACKS)}")
        if not 0.0 <= fraction < 1.0:
            raise AttackError(f"attack-fraction={fraction!r}: must be in [0, 1)")
        self.strategy = strategy
        self.attack, self.fraction, self.select, self.ids = attack, fraction, select, ids
        self.seed, self.collude, self.scale, self.kind = seed, collude, scale, kind
        self.key = arrayrecord_key
        self._global: ArrayRecord | None = None
        self._pids: dict[int, int] = {}
        self._num_partitions = 0
        self._history: dict[int, dict] = {}

    @property
    def history(self) -> dict[int, dict]:
        """The inner strategy's rows (if it keeps any) with the attack's columns."""
        inner = getattr(self.strategy, "history", None)
        rows = {k: dict(v) for k, v in inner.items()} if isinstance(inner, dict) else {}
        for rnd, extra in self._history.items():
            rows.setdefault(rnd, {}).update(extra)
            row = rows[rnd]
            if "rejected_nodes" in row:
                row.update(detection(row["rejected_nodes"], extra["malicious_nodes"]))
        return rows

    def summary(self) -> None:
        """Log the attack, then the inner strategy."""
        log(INFO, "\t├──> Attack: %s, fraction %.2f (%s)", self.attack, self.fraction, self.select)
        log(INFO, "\t├──> collude=%s scale=%s direction=%s", self.collude, self.scale, self.kind)
        self.strategy.summary()

    def malicious_nodes(self) -> list[int]:
        """Node ids of the malicious partitions (known once the partition map is asked)."""
        bad = set(
            malicious_partitions(
                self._num_partitions, self.fraction, self.select, self.seed, self.ids
            )
        )
        return sorted(n for n, p in self._pids.items() if p in bad)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid: Grid):
        """The inner strategy's messages; the partition ids of their nodes are asked once."""
        self._global = arrays
        msgs = list(self.strategy.configure_train(server_round, arrays, config, grid))
        nodes = sorted({m.metadata.dst_node_id for m in msgs} - set(self._pids))
        if nodes and self.attack != "none":
            from flowerbed.strategies.fedavg import query_partitions

            pmap, nparts = query_partitions(grid, nodes)
            self._pids.update(pmap)
            self._num_partitions = max(self._num_partitions, nparts)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Replace the malicious replies, then let the inner strategy aggregate."""
        replies = list(replies)
        bad_nodes = self.malicious_nodes()
        row = {
            "attack": self.attack,
            "malicious_nodes": bad_nodes,
            "malicious_partitions": sorted(self._pids[n] for n in bad_nodes),
        }
        if self.attack in MODEL_ATTACKS and self._global is not None:
            replies = self._poison(server_round, replies, set(bad_nodes))
        self._history[server_round] = row
        return self.strategy.aggregate_train(server_round, replies)

    def _poison(self, server_round: int, replies: list[Message], bad: set[int]) -> list[Message]:
        keys = list(self._global.keys())
        g = flatten(self._global, keys)
        usable = [m for m in replies if not m.has_error() and self.key in m.content.array_records]
        mal = sorted((m for m in usable if m.metadata.src_node_id in bad), key=_node)
        if not mal:
            return replies
        ben = [m for m in usable if m.metadata.src_node_id not in bad]
        own = np.stack([flatten(m.content[self.key], keys) - g for m in mal])
        benign = np.stack([flatten(m.content[self.key], keys) - g for m in ben]) if ben else own[:0]
        rng = np.random.default_rng(derive_seed(self.seed, server_round, 0xBAD))
        poisoned = poisoned_updates(
            self.attack, own, benign, len(usable), rng, self.scale, self.kind, self.collude
        )
        for msg, upd in zip(mal, poisoned, strict=True):
            content = RecordDict(dict(msg.content.items()))
            content[self.key] = unflatten(g + upd, self._global, keys)
            msg.content = content
        return replies

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    # checkpoint/resume of the inner strategy
    def state_dict(self) -> dict:
        inner = getattr(self.strategy, "state_dict", None)
        return inner() if inner else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.strategy, "load_state_dict"):
            self.strategy.load_state_dict(state)


def _node(msg: Message) -> int:
    return msg.metadata.src_node_id


def with_attack(strategy: Strategy, cfg: Mapping[str, Any]) -> Strategy:
    """``strategy`` wrapped in :class:`Attacked` when the run config has an attack."""
    if cfg.get("attack", "none") == "none":
        return strategy
    return Attacked(strategy, **attack_options(cfg))
