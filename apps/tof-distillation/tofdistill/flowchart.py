"""Flowchart construction from a client's selected dialogues, and flowchart quality against the
ground truth (Reconstruction: the paper extracts tuples with a locally deployed small LM and
deduplicates nodes by embedding similarity; here extraction is rule-based and documented).

Extraction, per dialogue, turn ``t`` of ``T``: the tuple ``(intent_t, db_t, action_t,
next_t)`` with ``next_t = intent_{t+1}`` (``END`` after the last turn), plus ``(START, "", "",
intent_1)``. The intent and action come from the dialogue's annotation (as MultiWOZ's dialogue
acts), ``db_t`` is the database condition shown at that step. Nodes are deduplicated by their
normalised intent label (:func:`normalise`: lower case, every run of characters other than
letters and digits replaced by ``_``), so ``"Inform Email"`` and ``"inform-email"`` are one
node. Construction is iterative: one dialogue after the other, each adding its tuples' counts;
conflicts are resolved when the chart is read (:meth:`Flowchart.rules`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from flowerbed.strategies.tof_distillation import END, START, Flowchart
from tofdistill.domains import Dialogue, ground_truth


def normalise(label: str) -> str:
    """The node key of an intent or action label."""
    return re.sub(r"[^a-z0-9=]+", "_", label.strip().lower()).strip("_")


def extract(dialogue: Dialogue) -> list[tuple[str, str, str, str, str]]:
    """The (task, intent, condition, action, next) tuples of one dialogue."""
    task, turns = dialogue.task, dialogue.turns
    if not turns:
        return []
    out = [(task, START, "", "", normalise(turns[0].intent))]
    for t, turn in enumerate(turns):
        nxt = normalise(turns[t + 1].intent) if t + 1 < len(turns) else END
        out.append((task, normalise(turn.intent), turn.db, normalise(turn.action), nxt))
    return out


def construct(dialogues: Iterable[Dialogue]) -> Flowchart:
    """A client's flowchart from its (selected) dialogues, one dialogue after the other."""
    counts: Counter = Counter()
    for d in dialogues:
        counts.update(extract(d))
    return Flowchart(counts)


def quality(chart: Flowchart, tasks: Iterable[str]) -> dict[str, float]:
    """Node coverage and edge precision / recall / F1 of ``chart``'s resolved edges against the
    ground truth of ``tasks`` (micro-averaged over the tasks).

    - node coverage: ground-truth intents that are a node of the chart / ground-truth intents;
    - edge precision: resolved edges that are ground-truth edges / resolved edges;
    - edge recall: ground-truth edges among the resolved edges / ground-truth edges.
    """
    tasks = list(tasks)
    truth = set().union(*(ground_truth(t) for t in tasks)) if tasks else set()
    got = {e for e in chart.edges() if e[0] in tasks}
    nodes_true = {(e[0], e[1]) for e in truth if e[1] != START}
    nodes_got = {(e[0], e[1]) for e in got if e[1] != START}
    hit = len(got & truth)
    p = hit / len(got) if got else 0.0
    r = hit / len(truth) if truth else 0.0
    return {
        "node_coverage": len(nodes_true & nodes_got) / len(nodes_true) if nodes_true else 0.0,
        "edge_precision": p,
        "edge_recall": r,
        "edge_f1": 2 * p * r / (p + r) if p + r else 0.0,
    }
