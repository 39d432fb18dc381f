"""The tiny student's word-level vocabulary (tests and tiny-model tables only; SmolLM2 uses its
own tokenizer).

Why words and not characters: with the character tokenizer every action is a 5-25 token string
that a random 4-layer, width-32 LLaMA adapted through LoRA has to spell out; 150-300 AdamW steps
left it at ~2 nats per character and greedy outputs such as ``'request_orest_od'``. Here every
action, intent, database condition and service is one token, so the tiny student's next action is
one next-token prediction (what a real tokenizer's first sub-word does for SmolLM2).

The vocabulary is fixed and built from the services' public inventory (:mod:`tofdistill.domains`:
utterance templates, fillers, slot-value lists, month names, intents, actions, conditions) and the
prompt's keywords; ids: 0 pad, 1 end of sequence, 2 unknown (a misspelt word of the user noise,
an unseen name), then the sorted words. Text is lower-cased and split into
``[a-z_][a-z0-9_]*(=[a-z]+)?`` words, single digits and single other characters.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from functools import lru_cache

from tofdistill import domains as D

_TOKEN = re.compile(r"[a-z_][a-z0-9_]*(?:=[a-z]+)?|\d|\S")
#: words of :func:`tofdistill.simulate.prompt` and :meth:`Flowchart.serialize`
PROMPT_WORDS = "service : flowchart previous user db action none -> [ ] end start"


def split(text: str) -> list[str]:
    """The word tokens of ``text`` (lower case)."""
    return _TOKEN.findall(text.lower())


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Every word the services' templates, slot lists and annotations can produce, sorted."""
    texts = [PROMPT_WORDS, *D.FILLERS, *D.CITIES, *D.PRODUCTS, *D.NAMES, *D.REASONS]
    texts += [re.sub(r"\{[a-z_]+\}", " ", t) for ts in D.TEMPLATES.values() for t in ts]
    texts += list(calendar.month_name[1:]) + ["example.com #@"] + [str(d) for d in range(10)]
    for task in D.TASKS:
        texts += [task, *D.actions(task), *D.db_values(task)]
        texts += [e[1] for e in D.ground_truth(task)] + [e[4] for e in D.ground_truth(task)]
    return tuple(sorted({w for t in texts for w in split(t)}))


class WordTokenizer:
    """Word ids over :func:`vocabulary` (0 pad, 1 end of sequence, 2 unknown)."""

    PAD, EOS, UNK = 0, 1, 2

    def __init__(self, words: Sequence[str] | None = None) -> None:
        self.words = tuple(vocabulary() if words is None else words)
        self._id = {w: i + 3 for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 3

    def encode(self, text: str) -> list[int]:
        return [self._id.get(w, self.UNK) for w in split(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """The words of ``ids`` joined by spaces, up to the first end of sequence."""
        out = []
        for i in map(int, ids):
            if i == self.EOS:
                break
            if i >= 3:
                out.append(self.words[i - 3])
            elif i == self.UNK:
                out.append("?")
        return " ".join(out)
