"""The domain tasks of the FedGRPO app (Reconstruction of the paper's domain clients): three real,
checkable kinds of question, generated deterministically from a seed, and the reward of the
authors' code (accuracy : format : tag-count = 8 : 1 : 1).

- ``arithmetic``: "What is 37 + 48?" (+, -, x of small integers);
- ``units``: "How many centimeters are in 7 meters?" (length, mass, time, volume);
- ``dates``: "What day of the week is 3 days after Monday?".

Each domain can solve (and so verify) its own questions only: :meth:`Domain.solve` returns None
for a question it does not recognise. The answer format is ``<answer>X</answer>``
(:func:`extract_answer`); the reward of a completion is ``8 accuracy + 1 format + 1 tag-count``
(:func:`reward`), as the authors' ``reward_weights`` (the think tags of their format reward are
left out: completions here are at most a few dozen tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

WEIGHTS = {"accuracy": 8.0, "format": 1.0, "tag_count": 1.0}  # the authors' reward_weights
REWARD_RANGE = sum(WEIGHTS.values())
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# (small unit, large unit, factor): "How many <small> are in <n> <large>?"
UNITS = (
    ("centimeters", "meters", 100),
    ("meters", "kilometers", 1000),
    ("grams", "kilograms", 1000),
    ("minutes", "hours", 60),
    ("seconds", "minutes", 60),
    ("hours", "days", 24),
    ("milliliters", "liters", 1000),
)
_ARITH = re.compile(r"^What is (\d+) ([+\-x]) (\d+)\?$")
_UNIT = re.compile(r"^How many (\w+) are in (\d+) (\w+)\?$")
_DATE = re.compile(r"^What day of the week is (\d+) days? (after|before) (\w+)\?$")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


@dataclass(frozen=True)
class Domain:
    """A domain: a question generator and the solver that verifies its answers."""

    name: str
    make: Callable[[np.random.Generator], tuple[str, str]]
    solve: Callable[[str], str | None]


def _make_arith(rng):
    op = ("+", "-", "x")[int(rng.integers(3))]
    if op == "x":
        a, b = int(rng.integers(2, 13)), int(rng.integers(2, 13))
    else:
        a, b = int(rng.integers(10, 100)), int(rng.integers(10, 100))
        if op == "-" and b > a:
            a, b = b, a
    q = f"What is {a} {op} {b}?"
    return q, _solve_arith(q)


def _solve_arith(q: str) -> str | None:
    m = _ARITH.match(q.strip())
    if not m:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def _make_units(rng):
    small, large, _ = UNITS[int(rng.integers(len(UNITS)))]
    q = f"How many {small} are in {int(rng.integers(2, 10))} {large}?"
    return q, _solve_units(q)


def _solve_units(q: str) -> str | None:
    m = _UNIT.match(q.strip())
    if not m:
        return None
    for small, large, factor in UNITS:
        if (m.group(1), m.group(3)) == (small, large):
            return str(int(m.group(2)) * factor)
    return None


def _make_dates(rng):
    n = int(rng.integers(1, 15))
    way = ("after", "before")[int(rng.integers(2))]
    q = f"What day of the week is {n} day{'s' if n > 1 else ''} {way} {DAYS[int(rng.integers(7))]}?"
    return q, _solve_dates(q)


def _solve_dates(q: str) -> str | None:
    m = _DATE.match(q.strip())
    if not m or m.group(3) not in DAYS:
        return None
    step = int(m.group(1)) * (1 if m.group(2) == "after" else -1)
    return DAYS[(DAYS.index(m.group(3)) + step) % 7]


DOMAINS = (
    Domain("arithmetic", _make_arith, _solve_arith),
    Domain("units", _make_units, _solve_units),
    Domain("dates", _make_dates, _solve_dates),
)
NAMES = tuple(d.name for d in DOMAINS)


def items(domain: int, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs of ``domain``, a function of ``seed`` only."""
    rng = np.random.default_rng(seed)
    return [DOMAINS[domain].make(rng) for _ in range(n)]


def domain_of(question: str) -> int | None:
    """The domain whose solver recognises ``question`` (None: none does)."""
    for k, d in enumerate(DOMAINS):
        if d.solve(question) is not None:
            return k
    return None


def solve(question: str) -> str | None:
    """The exact answer, by whichever domain recognises the question."""
    k = domain_of(question)
    return None if k is None else DOMAINS[k].solve(question)


# ---------------------------------------------------------------------------- rewards
def extract_answer(completion: str) -> str | None:
    """The text of the first ``<answer>...</answer>``, stripped (None: no such span)."""
    m = _ANSWER.search(completion)
    return m.group(1).strip() if m else None


def same_answer(got: str | None, want: str) -> bool:
    """Exact match up to case, surrounding spaces and a trailing full stop."""
    if got is None:
        return False
    return got.strip().rstrip(".").strip().lower() == want.strip().lower()


def format_reward(completion: str) -> float:
    """1 if the completion is exactly one ``<answer>...</answer>`` (spaces around allowed)."""
    return 1.0 if re.fullmatch(r"\s*<answer>[^<>]*</answer>\s*", completion) else 0.0


def tag_count_reward(completion: str) -> float:
    """0.5 per tag (``<answer>``, ``</answer>``) that occurs exactly once (the authors' tag-count
    reward with the answer tags only)."""
    return 0.5 * (completion.count("<answer>") == 1) + 0.5 * (completion.count("</answer>") == 1)


def reward(accuracy: float, completion: str) -> float:
    """``8 accuracy + 1 format + 1 tag-count`` (the authors' weights)."""
    return (
        WEIGHTS["accuracy"] * accuracy
        + WEIGHTS["format"] * format_reward(completion)
        + WEIGHTS["tag_count"] * tag_count_reward(completion)
    )


def exact_rewards(question: str, completions: Sequence[str]) -> np.ndarray:
    """The exact reward of each completion (the reference: every domain's solver)."""
    want = solve(question)
    return np.asarray(
        [
            reward(float(want is not None and same_answer(extract_answer(c), want)), c)
            for c in completions
        ]
    )


def expert_rewards(
    question: str, completions: Sequence[str], own: int, ood_error: float, rng: np.random.Generator
) -> np.ndarray:
    """The rewards a client expert in domain ``own`` gives.

    In its own domain the accuracy verdict is exact. Outside it the client cannot verify the
    answer: its verdict is wrong with probability ``ood_error`` (a simulated non-expert judge,
    0.5 = a coin flip). Format and tag-count are checked exactly by every client.
    """
    want = solve(question)
    out = []
    for c in completions:
        right = want is not None and same_answer(extract_answer(c), want)
        if DOMAINS[own].solve(question) is None and rng.random() < ood_error:
            right = not right
        out.append(reward(float(right), c))
    return np.asarray(out)
