"""Synthetic dialogues from a flowchart, the student's prompts, and the evaluation with simulated
users (Reconstruction: the paper's user simulator and metric code are not available).

- **Synthetic dialogues** (:func:`synthesize`): random walks over a flowchart's resolved rules,
  realised with the clean utterance templates (no noise, no agent error), seeded.
- **Prompt** (:func:`prompt`): the service name, the serialized flowchart of that service when
  guided (``intent [condition] -> action`` per line), the previous system action, the user's
  utterance and the database line of the step; the target is the next system action.
- **Simulated user** (:func:`simulate`): its hidden goal is a random walk over the ground truth
  (the database state, the slot values, which optional requests it makes). Each turn it says the
  current step's utterance (with noise); when the policy answers with the step's action it moves
  on, otherwise it repeats the step. At most ``len(path) + extra_turns`` turns.
- **Metrics** (MultiWOZ-style, adapted): *inform* = the policy answered every database-dependent
  step of the goal (the information that depends on the user's constraints) with the right action;
  *success* = inform and every step of the goal answered in order within the turn budget (every
  request served and the dialogue closed); *action accuracy* = next-action accuracy with the gold
  history (teacher forcing) over the goals' turns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from flowerbed.strategies.tof_distillation import Flowchart
from tofdistill import domains as D


@dataclass(frozen=True)
class State:
    """What the system sees at one step (``intent`` is the annotation: the LM policy never
    reads it; the scripted test policies do)."""

    task: str
    intent: str
    text: str
    db: str
    prev: str


Policy = Callable[[Sequence[State]], list[str]]


def prompt(state: State, chart_text: str | None) -> str:
    """The student's input for ``state``; ``chart_text`` None: unguided."""
    head = f"Service: {state.task}\n"
    if chart_text:
        head += f"Flowchart:\n{chart_text}\n"
    db = f"DB: {state.db}\n" if state.db else ""
    return f"{head}Previous: {state.prev or 'none'}\nUser: {state.text}\n{db}Action:"


def target(action: str) -> str:
    return f" {action}"


def synthesize(chart: Flowchart, tasks: Sequence[str], per_task: int, seed: int):
    """``per_task`` synthetic dialogues per task of ``tasks`` the chart knows (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for task in tasks:
        rules = chart.rules(task)
        if not rules[0]:
            continue
        for _ in range(per_task):
            path = D.walk(rules, task, rng)
            if path:
                out.append(D.realise(task, path, rng))
    return out


def states(dialogue: D.Dialogue) -> list[tuple[State, str]]:
    """``(state, gold action)`` for every turn of ``dialogue`` (gold history)."""
    out, prev = [], ""
    for t in dialogue.turns:
        out.append((State(dialogue.task, t.intent, t.text, t.db, prev), t.action))
        prev = t.action
    return out


@dataclass(frozen=True)
class Goal:
    task: str
    path: tuple[tuple[str, str, str], ...]
    seed: int


def test_goals(tasks: Sequence[str], per_task: int, seed: int) -> list[Goal]:
    """``per_task`` held-out user goals per task: ground-truth walks (fixed seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for task in tasks:
        rules = D.rules_of(task)
        for _ in range(per_task):
            out.append(Goal(task, tuple(D.walk(rules, task, rng)), int(rng.integers(2**31))))
    return out


def simulate(policy: Policy, goals: Sequence[Goal], noise: float, extra_turns: int = 2) -> dict:
    """Talk to ``policy`` with every goal's simulated user (all users in lockstep, one batched
    policy call per turn); returns ``success``, ``inform``, ``turns`` (mean turns used) and
    ``success_<task>``."""
    rngs = [np.random.default_rng(g.seed) for g in goals]
    slots = [D.slot_values(r) for r in rngs]
    step = [0] * len(goals)
    prev = [""] * len(goals)
    used = [0] * len(goals)
    informed = [True] * len(goals)
    budget = [len(g.path) + extra_turns for g in goals]
    active = [i for i, g in enumerate(goals) if g.path]
    while active:
        batch = []
        for i in active:
            intent, cond, _ = goals[i].path[step[i]]
            text = D.utterance(intent, slots[i], rngs[i], noise)
            batch.append(State(goals[i].task, intent, text, cond, prev[i]))
        answers = policy(batch)
        still = []
        for i, action in zip(active, answers, strict=True):
            _, cond, gold = goals[i].path[step[i]]
            used[i] += 1
            prev[i] = action
            if action == gold:
                step[i] += 1
            if step[i] < len(goals[i].path) and used[i] < budget[i]:
                still.append(i)
        active = still
    for i, g in enumerate(goals):
        # inform: every database-dependent step of the goal reached and answered
        conds = [k for k, (_, c, _) in enumerate(g.path) if c]
        informed[i] = all(k < step[i] for k in conds)
    done = [step[i] == len(g.path) and len(g.path) > 0 for i, g in enumerate(goals)]
    out = {
        "success": float(np.mean([d and f for d, f in zip(done, informed, strict=True)])),
        "inform": float(np.mean(informed)),
        "turns": float(np.mean(used)),
    }
    for task in sorted({g.task for g in goals}):
        idx = [i for i, g in enumerate(goals) if g.task == task]
        out[f"success_{task}"] = float(np.mean([done[i] and informed[i] for i in idx]))
    return out


def action_accuracy(policy: Policy, goals: Sequence[Goal], noise: float) -> float:
    """Next-action accuracy with the gold history over the goals' turns."""
    pairs = []
    for g in goals:
        rng = np.random.default_rng(g.seed + 1)
        pairs += states(D.realise(g.task, list(g.path), rng, noise))
    if not pairs:
        return 0.0
    answers = policy([s for s, _ in pairs])
    return float(np.mean([a == gold for a, (_, gold) in zip(answers, pairs, strict=True)]))


def oracle_policy(chart: Flowchart) -> Policy:
    """A scripted policy that reads the annotated intent and looks the action up in ``chart``
    (the tests' perfect policy with the ground truth)."""

    def act(batch: Sequence[State]) -> list[str]:
        out = []
        for s in batch:
            rules, _ = chart.rules(s.task)
            rule = rules.get((s.intent, s.db)) or rules.get((s.intent, ""))
            out.append(rule[0] if rule else "")
        return out

    return act


def ground_truth_chart(tasks: Sequence[str]) -> Flowchart:
    """The ground truth of ``tasks`` as a Flowchart (every edge counted once)."""
    return Flowchart({e: 1 for t in tasks for e in D.ground_truth(t)})
