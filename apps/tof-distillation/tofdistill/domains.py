"""The service tasks: ground-truth flowcharts, slot values, utterance templates and the clients'
private dialogues (Reconstruction: the paper uses MultiWOZ 2.0; these four hand-written services
stand in for it).

A flowchart is a set of **edges** ``(task, intent, condition, action, next)``: when the user
expresses ``intent`` and the database shows ``condition`` (``""`` when the step does not depend on
it, else ``"key=value"``), the system answers with ``action`` and the user's next intent is one of
the edges' ``next`` (``"END"`` closes the dialogue). The edge ``(task, "START", "", "", first)``
names the opening intent. A dialogue's database state (``status``, ``eligible``, ``available``,
``verified``) is drawn once per dialogue and shown to the system only at the steps that branch on
it.

What is real and what is template:

- real: city names (capitals and large cities), calendar dates of 2026 (``datetime``), product
  types, first names (in e-mail addresses and usernames);
- template: order ids (``#`` + 6 digits), verification codes (6 digits), e-mail domains
  (``example.com``), the utterance sentences and their noise (filler words, one swapped letter).

Every dialogue is a seeded random walk over a ground-truth flowchart (``numpy`` generator from the
caller's seed), so a client's private dialogues are a function of (run seed, partition id).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np

START, END = "START", "END"

# (intent, condition, action, next intents); the first row's intent opens the dialogue
_ORDER = [
    ("track_order", "", "request_order_id", ("inform_order_id",)),
    ("inform_order_id", "", "request_email", ("inform_email",)),
    ("inform_email", "status=shipped", "inform_shipped", ("ask_delivery_date", "ask_tracking")),
    ("inform_email", "status=processing", "inform_processing", ("ask_cancel", "thank")),
    ("inform_email", "status=delivered", "inform_delivered", ("report_missing", "thank")),
    ("ask_delivery_date", "", "inform_delivery_date", ("thank",)),
    ("ask_tracking", "", "inform_tracking_number", ("thank",)),
    ("ask_cancel", "", "confirm_cancel", ("thank",)),
    ("report_missing", "", "open_investigation", ("thank",)),
    ("thank", "", "goodbye", (END,)),
]
_REFUND = [
    ("request_refund", "", "request_order_id", ("inform_order_id",)),
    ("inform_order_id", "", "request_product", ("inform_product",)),
    ("inform_product", "", "request_reason", ("inform_reason",)),
    ("inform_reason", "eligible=yes", "offer_refund", ("accept_refund", "ask_store_credit")),
    ("inform_reason", "eligible=no", "deny_refund", ("ask_exception", "thank")),
    ("accept_refund", "", "confirm_refund", ("ask_refund_time", "thank")),
    ("ask_store_credit", "", "issue_store_credit", ("thank",)),
    ("ask_exception", "", "transfer_agent", ("thank",)),
    ("ask_refund_time", "", "inform_refund_time", ("thank",)),
    ("thank", "", "goodbye", (END,)),
]
_HOTEL = [
    ("book_hotel", "", "request_city", ("inform_city",)),
    ("inform_city", "", "request_dates", ("inform_dates",)),
    ("inform_dates", "", "request_people", ("inform_people",)),
    (
        "inform_people",
        "available=yes",
        "offer_hotel",
        ("accept_offer", "ask_price", "ask_breakfast"),
    ),
    ("inform_people", "available=no", "inform_no_availability", ("change_dates", "thank")),
    ("change_dates", "", "offer_alternative", ("accept_offer", "thank")),
    ("ask_price", "", "inform_price", ("accept_offer", "thank")),
    ("ask_breakfast", "", "inform_breakfast", ("accept_offer",)),
    ("accept_offer", "", "confirm_booking", ("thank",)),
    ("thank", "", "goodbye", (END,)),
]
_ACCOUNT = [
    ("reset_password", "", "request_username", ("inform_username",)),
    ("inform_username", "", "request_email", ("inform_email",)),
    ("inform_email", "", "send_code", ("inform_code",)),
    ("inform_code", "verified=yes", "confirm_reset", ("ask_2fa", "thank")),
    ("inform_code", "verified=no", "reject_code", ("request_new_code", "thank")),
    ("request_new_code", "", "send_new_code", ("inform_new_code",)),
    ("inform_new_code", "", "confirm_reset", ("ask_2fa", "thank")),
    ("ask_2fa", "", "explain_2fa", ("thank",)),
    ("thank", "", "goodbye", (END,)),
]
_RULES = {
    "order_tracking": _ORDER,
    "refund": _REFUND,
    "hotel_booking": _HOTEL,
    "account_reset": _ACCOUNT,
}
TASKS: tuple[str, ...] = tuple(_RULES)
DB_KEYS = {"order_tracking": "status", "refund": "eligible", "hotel_booking": "available"}
DB_KEYS["account_reset"] = "verified"


def ground_truth(task: str) -> set[tuple[str, str, str, str, str]]:
    """The ground-truth edges of ``task`` (the START edge included)."""
    rules = _RULES[task]
    edges = {(task, START, "", "", rules[0][0])}
    for intent, cond, action, nexts in rules:
        edges |= {(task, intent, cond, action, n) for n in nexts}
    return edges


def actions(task: str) -> tuple[str, ...]:
    """The system actions of ``task``, sorted."""
    return tuple(sorted({r[2] for r in _RULES[task]}))


def db_values(task: str) -> tuple[str, ...]:
    """The database conditions ``key=value`` of ``task``, sorted."""
    return tuple(sorted({r[1] for r in _RULES[task] if r[1]}))


# ---------------------------------------------------------------------------- slot values
CITIES = (
    "Amsterdam", "Barcelona", "Berlin", "Chicago", "Dubai", "Hong Kong", "Istanbul", "Lisbon",
    "London", "Madrid", "Nairobi", "Osaka", "Paris", "Prague", "Rome", "Seoul", "Singapore",
    "Sydney", "Tokyo", "Toronto", "Vienna", "Warsaw",
)  # fmt: skip
PRODUCTS = (
    "wireless mouse", "USB-C charger", "laptop stand", "coffee grinder", "yoga mat",
    "bluetooth speaker", "desk lamp", "running shoes", "backpack", "electric kettle",
    "phone case", "winter jacket", "mechanical keyboard", "air fryer",
)  # fmt: skip
NAMES = (
    "anna", "ben", "carla", "david", "elena", "farid", "grace", "hiro", "ines", "jamal", "kofi",
    "lena", "mateo", "nadia", "omar", "priya", "quinn", "rosa", "sven", "yuki",
)  # fmt: skip
REASONS = ("it arrived damaged", "it is the wrong size", "I changed my mind", "it stopped working")
_YEAR0 = _dt.date(2026, 1, 1)


def slot_values(rng: np.random.Generator) -> dict[str, str]:
    """One user's slot values (real cities, dates, products, names; template ids and codes)."""
    name = NAMES[rng.integers(len(NAMES))]
    day = _YEAR0 + _dt.timedelta(days=int(rng.integers(365)))
    return {
        "order_id": f"#{rng.integers(100000, 999999)}",
        "email": f"{name}.{rng.integers(10, 99)}@example.com",
        "username": f"{name}{rng.integers(100, 999)}",
        "code": f"{rng.integers(100000, 999999)}",
        "product": PRODUCTS[rng.integers(len(PRODUCTS))],
        "reason": REASONS[rng.integers(len(REASONS))],
        "city": CITIES[rng.integers(len(CITIES))],
        "date": day.strftime("%B %d"),
        "nights": str(int(rng.integers(1, 8))),
        "people": str(int(rng.integers(1, 5))),
    }


# ---------------------------------------------------------------------------- utterances
TEMPLATES: dict[str, tuple[str, ...]] = {
    "track_order": ("where is my order?", "I want to track my order", "can you check my package"),
    "request_refund": ("I would like a refund", "I want my money back", "can I return an item"),
    "book_hotel": ("I need a hotel room", "I want to book a hotel", "looking for a hotel"),
    "reset_password": (
        "I forgot my password",
        "I cannot log in to my account",
        "reset my password",
    ),
    "inform_order_id": ("the order number is {order_id}", "it is order {order_id}", "{order_id}"),
    "inform_email": ("my email is {email}", "use {email}", "it's {email}"),
    "inform_username": ("my username is {username}", "the user name is {username}"),
    "inform_code": ("the code is {code}", "I got {code}"),
    "inform_new_code": ("the new code is {code}", "ok the new one is {code}"),
    "inform_product": ("it was a {product}", "the {product}", "I bought a {product}"),
    "inform_reason": ("{reason}", "because {reason}"),
    "inform_city": ("in {city}", "I am going to {city}", "{city} please"),
    "inform_dates": ("from {date} for {nights} nights", "{nights} nights starting {date}"),
    "inform_people": ("for {people} people", "{people} guests", "we are {people}"),
    "ask_delivery_date": ("when will it arrive?", "what is the delivery date"),
    "ask_tracking": ("can I have the tracking number", "send me the tracking code"),
    "ask_cancel": ("please cancel it", "can I still cancel the order"),
    "report_missing": ("but I never received it", "it is not at my door"),
    "accept_refund": ("yes please refund me", "ok, go ahead with the refund"),
    "ask_store_credit": ("could I get store credit instead", "store credit is fine"),
    "ask_exception": ("can you make an exception", "please, it is really important"),
    "ask_refund_time": ("how long will the refund take", "when do I get the money"),
    "change_dates": ("what about other dates", "can we try different dates"),
    "ask_price": ("how much is it per night", "what is the price"),
    "ask_breakfast": ("is breakfast included", "do you serve breakfast"),
    "accept_offer": ("great, book it", "yes I will take it"),
    "request_new_code": ("send me a new code", "can I get another code"),
    "ask_2fa": ("how do I turn on two factor", "what about two-step login"),
    "thank": ("thanks, that's all", "thank you, bye", "great, thanks"),
}
FILLERS = ("", "", "um ", "hi, ", "ok so ", "well ", "hello, ")


def _typo(text: str, rng: np.random.Generator) -> str:
    """Swap two adjacent letters of one word longer than 3 letters (if there is one)."""
    words = text.split(" ")
    long = [i for i, w in enumerate(words) if len(w) > 3 and w.isalpha()]
    if not long:
        return text
    i = long[int(rng.integers(len(long)))]
    w = words[i]
    j = int(rng.integers(len(w) - 1))
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def utterance(intent: str, slots: dict[str, str], rng: np.random.Generator, noise: float) -> str:
    """A user utterance of ``intent`` with ``slots``; with probability ``noise`` a filler word and
    a swapped letter (noise 0: a clean template)."""
    text = TEMPLATES[intent][int(rng.integers(len(TEMPLATES[intent])))].format(**slots)
    if noise > 0 and rng.random() < noise:
        text = FILLERS[int(rng.integers(len(FILLERS)))] + _typo(text, rng)
    return text


# ---------------------------------------------------------------------------- dialogues
@dataclass(frozen=True)
class Turn:
    """One exchange: the user's utterance (with its intent annotation), the database condition
    shown to the system at this step (``""`` if none) and the system's action."""

    intent: str
    text: str
    db: str
    action: str


@dataclass(frozen=True)
class Dialogue:
    task: str
    turns: tuple[Turn, ...]

    @property
    def cost(self) -> int:
        """Length in words (utterances and actions): the selection's cost ``c_d``."""
        return sum(len(t.text.split()) + 1 for t in self.turns)

    def labels(self) -> set[str]:
        """The set-cover elements it contains: its user intents, each with the database
        condition shown at that step, ``task:intent`` or ``task:intent|key=value``."""
        return {f"{self.task}:{t.intent}" + (f"|{t.db}" if t.db else "") for t in self.turns}


def walk(
    edges, task: str, rng: np.random.Generator, state: dict[str, str] | None = None, max_len=12
):
    """A random walk over the flowchart ``edges`` of ``task``: ``[(intent, condition, action)]``.

    ``edges`` maps ``(intent, condition)`` to ``(action, next intents)``; the database state
    (``key=value`` per key) is drawn uniformly from the conditions the chart knows unless given;
    each next intent is drawn uniformly. Stops at END, at a step the chart has no rule for, or
    after ``max_len`` steps.
    """
    rules, start = edges
    if state is None:
        by_key: dict[str, list[str]] = {}
        for _, cond in sorted(rules):
            if cond:
                by_key.setdefault(cond.split("=")[0], []).append(cond)
        state = {k: sorted(set(v))[int(rng.integers(len(set(v))))] for k, v in by_key.items()}
    path, intent = [], start
    while intent not in (END, None) and len(path) < max_len:
        cond = next((c for c in state.values() if (intent, c) in rules), "")
        if (intent, cond) not in rules:
            break
        action, nexts = rules[(intent, cond)]
        path.append((intent, cond, action))
        intent = nexts[int(rng.integers(len(nexts)))] if nexts else None
    return path


def rules_of(task: str):
    """The ground truth of ``task`` as :func:`walk` reads it."""
    rules = {(i, c): (a, tuple(n)) for i, c, a, n in _RULES[task]}
    return rules, _RULES[task][0][0]


def realise(
    task: str,
    path,
    rng: np.random.Generator,
    noise: float = 0.0,
    agent_error: float = 0.0,
) -> Dialogue:
    """Turn a path into a dialogue: templated user utterances (``noise``), and with probability
    ``agent_error`` per step a human agent's wrong action first (the user then repeats the step)."""
    slots = slot_values(rng)
    wrong = actions(task)
    turns = []
    for intent, cond, action in path:
        if agent_error > 0 and rng.random() < agent_error:
            bad = [a for a in wrong if a != action]
            turns.append(
                Turn(intent, utterance(intent, slots, rng, noise), cond, str(rng.choice(bad)))
            )
        turns.append(Turn(intent, utterance(intent, slots, rng, noise), cond, action))
    return Dialogue(task, tuple(turns))


def private_dialogues(
    tasks, per_task: int, seed: int, noise: float, agent_error: float
) -> list[Dialogue]:
    """A client's private dialogues: ``per_task`` random walks over each of its tasks' ground
    truths, realised with noise and agent errors (seeded by ``seed``)."""
    rng = np.random.default_rng(seed)
    out = []
    for task in tasks:
        rules = rules_of(task)
        for _ in range(per_task):
            out.append(realise(task, walk(rules, task, rng), rng, noise, agent_error))
    return out
