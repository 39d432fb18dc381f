"""Dialogue selection as weighted set cover (From the paper: "WDIC solved via LP relaxation +
randomized rounding"; the rounding details are a Reconstruction):

    min  sum_d c_d x_d   s.t.  sum_{d contains i} x_d >= 1  for every element i,  x_d in {0, 1}

Elements are the intents and actions of a client's dialogues (``task:label``), ``c_d`` the
dialogue's length in words. Three solvers, all returning the selected indices in increasing order:

- :func:`lp_rounding`: the LP relaxation (``scipy.optimize.linprog``, HiGHS), then
  ``ceil(2 ln |I|)`` rounds of randomized rounding (dialogue ``d`` joins with probability
  ``x_d*``), then greedy repair of any uncovered element, then a reverse-delete pass that drops
  selected dialogues, most expensive first, while everything stays covered (Reconstruction);
- :func:`greedy`: the classic ratio greedy (cheapest cost per newly covered element);
- :func:`exact`: the integer program (``scipy.optimize.milp``), the optimum on small instances.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp


class CoverError(ValueError):
    """An element that no candidate set contains: no cover exists."""


def _matrix(sets: Sequence[set], costs: Sequence[float]):
    elements = sorted(set().union(*sets)) if sets else []
    a = np.zeros((len(elements), len(sets)))
    index = {e: i for i, e in enumerate(elements)}
    for j, s in enumerate(sets):
        for e in s:
            a[index[e], j] = 1.0
    c = np.asarray(costs, dtype=float)
    if len(c) != len(sets) or (c <= 0).any():
        raise ValueError("set cover: one positive cost per set")
    return elements, a, c


def covers(sets: Sequence[set], chosen: Sequence[int]) -> bool:
    """Whether ``chosen`` covers every element of ``sets``."""
    want = set().union(*sets) if sets else set()
    got = set().union(*(sets[j] for j in chosen)) if chosen else set()
    return want <= got


def _repair(sets, costs, chosen: set[int]) -> set[int]:
    """Add sets by the greedy ratio until every element is covered."""
    universe = set().union(*sets) if sets else set()
    covered = set().union(*(sets[j] for j in chosen)) if chosen else set()
    while covered < universe:
        j = min(
            (j for j in range(len(sets)) if sets[j] - covered),
            key=lambda j: (costs[j] / len(sets[j] - covered), j),
        )
        chosen.add(j)
        covered |= sets[j]
    return chosen


def _prune(sets, costs, chosen: set[int]) -> set[int]:
    """Reverse delete: drop the most expensive redundant sets first."""
    for j in sorted(chosen, key=lambda j: (-costs[j], -j)):
        rest = chosen - {j}
        if covers(sets, sorted(rest)) or not sets:
            chosen = rest
    return chosen


def greedy(sets: Sequence[set], costs: Sequence[float]) -> list[int]:
    """Ratio greedy (ties: lowest index)."""
    _matrix(sets, costs)
    return sorted(_repair(sets, list(costs), set()))


def lp_relaxation(sets: Sequence[set], costs: Sequence[float]) -> np.ndarray:
    """``x*`` of the LP relaxation (``0 <= x <= 1``)."""
    _, a, c = _matrix(sets, costs)
    if len(a) and (a.sum(1) == 0).any():
        raise CoverError("an element is in no set")
    res = linprog(c, A_ub=-a, b_ub=-np.ones(len(a)), bounds=(0, 1), method="highs")
    if res.status != 0:
        raise CoverError(f"LP relaxation failed: {res.message}")
    return np.clip(res.x, 0.0, 1.0)


def rounding_repetitions(num_elements: int) -> int:
    """``ceil(2 ln |I|)`` (at least 1)."""
    return max(1, math.ceil(2 * math.log(max(num_elements, 1))))


def randomized_rounding(x: np.ndarray, repetitions: int, seed: int) -> set[int]:
    """The union over ``repetitions`` independent rounds in which set ``d`` joins with
    probability ``x[d]``."""
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for _ in range(repetitions):
        chosen |= {int(j) for j in np.flatnonzero(rng.random(len(x)) < x)}
    return chosen


def lp_rounding(sets: Sequence[set], costs: Sequence[float], seed: int) -> list[int]:
    """LP relaxation + randomized rounding + greedy repair + reverse delete."""
    x = lp_relaxation(sets, costs)
    universe = set().union(*sets) if sets else set()
    chosen = randomized_rounding(x, rounding_repetitions(len(universe)), seed)
    chosen = _repair(sets, list(costs), chosen)
    return sorted(_prune(sets, list(costs), chosen))


def exact(sets: Sequence[set], costs: Sequence[float]) -> list[int]:
    """The integer optimum (``scipy.optimize.milp``)."""
    _, a, c = _matrix(sets, costs)
    if not len(a):
        return []
    res = milp(
        c,
        constraints=LinearConstraint(a, lb=np.ones(len(a)), ub=np.inf),
        integrality=np.ones(len(c)),
        bounds=Bounds(0, 1),
    )
    if res.status != 0:
        raise CoverError(f"ILP failed: {res.message}")
    return sorted(int(j) for j in np.flatnonzero(res.x > 0.5))


SOLVERS = ("lp", "greedy", "ilp")


def select(sets: Sequence[set], costs: Sequence[float], how: str, seed: int) -> list[int]:
    """The dialogues ``how`` (``lp``, ``greedy`` or ``ilp``) selects."""
    if how == "lp":
        return lp_rounding(sets, costs, seed)
    if how == "greedy":
        return greedy(sets, costs)
    if how == "ilp":
        return exact(sets, costs)
    raise ValueError(f"selection {how!r}: one of {', '.join(SOLVERS)}")
