"""TOF distillation, unit tier: the service tasks, the set cover (hand-made instances), flowchart
construction and merge on hand-made dialogues, synthetic dialogues and the simulated user."""

import math

import numpy as np
import pytest

from flowerbed.common.testing import app_path
from flowerbed.strategies.tof_distillation import END, START, Flowchart

app_path("tof-distillation")

from tofdistill import domains as D  # noqa: E402
from tofdistill import flowchart as F  # noqa: E402
from tofdistill import selection as S  # noqa: E402
from tofdistill import simulate as M  # noqa: E402


# ---------------------------------------------------------------------------- tasks
def test_ground_truth_flowcharts_are_connected_and_sized():
    for task in D.TASKS:
        gt = D.ground_truth(task)
        intents = {e[1] for e in gt} - {START}
        assert 8 <= len(intents) <= 12, task
        reached = {e[4] for e in gt}
        assert intents <= reached  # every intent is reachable (START edge included)
        assert END in reached and len(D.db_values(task)) >= 2


def test_private_dialogues_are_seeded_walks_of_the_ground_truth():
    a = D.private_dialogues(["refund", "hotel_booking"], 5, 3, 0.5, 0.0)
    assert a == D.private_dialogues(["refund", "hotel_booking"], 5, 3, 0.5, 0.0)
    assert a != D.private_dialogues(["refund", "hotel_booking"], 5, 4, 0.5, 0.0)
    assert [d.task for d in a] == ["refund"] * 5 + ["hotel_booking"] * 5
    for d in a:
        rules, start = D.rules_of(d.task)
        assert d.turns[0].intent == start and d.turns[-1].action == "goodbye"
        for t in d.turns:
            assert rules[(t.intent, t.db)][0] == t.action  # no agent error: every action right
    clean = D.private_dialogues(["hotel_booking"], 5, 3, 0.0, 0.0)  # noise swaps letters
    cities = [t.text for d in clean for t in d.turns if t.intent == "inform_city"]
    assert cities and all(any(c in x for c in D.CITIES) for x in cities)  # real city names


def test_agent_errors_are_followed_by_a_repeat():
    d = D.private_dialogues(["order_tracking"], 30, 1, 0.0, 0.5)
    rules, _ = D.rules_of("order_tracking")
    wrong = [
        (d_, i)
        for d_ in d
        for i, t in enumerate(d_.turns)
        if rules[(t.intent, t.db)][0] != t.action
    ]
    assert wrong
    for dia, i in wrong:  # the user repeats the step and the agent answers right
        nxt = dia.turns[i + 1]
        assert nxt.intent == dia.turns[i].intent and rules[(nxt.intent, nxt.db)][0] == nxt.action


# ---------------------------------------------------------------------------- set cover
#: greedy takes the big set first (4 new elements) and then needs both others: cost 3; optimum 2
GREEDY_TRAP = ([{1, 2, 3}, {4, 5, 6}, {1, 2, 4, 5}], [1.0, 1.0, 1.0])
#: weighted: the cheap singletons (cost 1 each, total 3) beat the one set of cost 3.5
WEIGHTED = ([{"a", "b", "c"}, {"a"}, {"b"}, {"c"}, {"a", "b"}], [3.5, 1.0, 1.0, 1.0, 2.5])


def test_exact_ilp_is_optimal_on_hand_made_instances():
    assert S.exact(*GREEDY_TRAP) == [0, 1]
    assert S.exact(*WEIGHTED) == [1, 2, 3]  # cost 3 < 3.5 and < 2.5 + 1


def test_greedy_falls_in_the_trap_and_lp_rounding_does_not():
    assert S.greedy(*GREEDY_TRAP) == [0, 1, 2]
    for seed in range(5):
        assert S.lp_rounding(*GREEDY_TRAP, seed=seed) == [0, 1]
    x = S.lp_relaxation(*GREEDY_TRAP)
    np.testing.assert_allclose(x, [1.0, 1.0, 0.0], atol=1e-9)


def test_lp_relaxation_value_is_a_lower_bound_and_fractional_on_a_triangle():
    # every element in two of three sets: x = 1/2 each, LP value 1.5 < integer optimum 2
    sets, costs = [{1, 2}, {2, 3}, {1, 3}], [1.0, 1.0, 1.0]
    x = S.lp_relaxation(sets, costs)
    np.testing.assert_allclose(x, [0.5, 0.5, 0.5], atol=1e-9)
    assert len(S.exact(sets, costs)) == 2
    for seed in range(5):
        got = S.lp_rounding(sets, costs, seed=seed)
        assert S.covers(sets, got) and len(got) == 2  # reverse delete leaves no redundant set


def test_randomized_rounding_includes_each_set_with_probability_x():
    assert all(S.randomized_rounding(np.array([1.0, 0.0]), 3, s) == {0} for s in range(20))
    x = np.full(2000, 0.5)
    one = len(S.randomized_rounding(x, 1, seed=0)) / len(x)
    three = len(S.randomized_rounding(x, 3, seed=0)) / len(x)
    assert one == pytest.approx(0.5, abs=0.04)
    assert three == pytest.approx(1 - 0.5**3, abs=0.03)  # union of three rounds


def test_greedy_takes_the_best_cost_per_new_element():
    assert S.greedy(*WEIGHTED) == [1, 2, 3]  # ratio 1 each, not the big set (3.5 / 3)


def test_rounding_repetitions_is_ceil_two_ln():
    assert S.rounding_repetitions(20) == math.ceil(2 * math.log(20)) == 6
    assert S.rounding_repetitions(1) == 1


def test_every_solver_covers_every_intent_and_lp_is_seeded():
    ds = D.private_dialogues(["order_tracking", "account_reset"], 20, 11, 0.3, 0.1)
    sets, costs = [d.labels() for d in ds], [d.cost for d in ds]
    best = sum(costs[j] for j in S.exact(sets, costs))
    for how in S.SOLVERS:
        got = S.select(sets, costs, how, seed=5)
        assert S.covers(sets, got), how
        assert sum(costs[j] for j in got) >= best - 1e-9, how
    assert S.select(sets, costs, "lp", 5) == S.select(sets, costs, "lp", 5)
    with pytest.raises(ValueError, match="selection 'magic'"):
        S.select(sets, costs, "magic", 0)


# ---------------------------------------------------------------------------- flowcharts
def _dia(task, *turns):
    return D.Dialogue(task, tuple(D.Turn(i, i, db, a) for i, db, a in turns))


#: two hand-made dialogues of a 3-step service; the second has an agent error at step 2
DIA1 = _dia("svc", ("Hello", "", "ask_id"), ("give id", "", "check"), ("Thanks", "", "bye"))
DIA2 = _dia(
    "svc",
    ("hello", "", "ask_id"),
    ("give-id", "", "bye"),
    ("give id", "", "check"),
    ("complain", "ok=no", "apologise"),
    ("thanks", "", "bye"),
)


def test_extraction_by_hand():
    assert F.extract(DIA1) == [
        ("svc", START, "", "", "hello"),
        ("svc", "hello", "", "ask_id", "give_id"),
        ("svc", "give_id", "", "check", "thanks"),
        ("svc", "thanks", "", "bye", END),
    ]


def test_construction_dedups_nodes_and_resolves_the_agent_error():
    chart = F.construct([DIA1, DIA2])
    # "give id" and "give-id" are one node; the error is a self-loop (count 1) next to "check"
    assert chart.counts[("svc", "give_id", "", "bye", "give_id")] == 1
    assert chart.counts[("svc", "give_id", "", "check", "thanks")] == 1
    rules, start = chart.rules("svc")
    assert start == "hello"
    assert rules[("give_id", "")] == ("check", ("complain", "thanks"))  # tie: the moving action
    assert rules[("complain", "ok=no")] == ("apologise", ("thanks",))
    assert ("svc", "give_id", "", "bye", "give_id") not in chart.edges()
    assert chart.serialize("svc").splitlines() == [
        "complain [ok=no] -> apologise",
        "give_id -> check",
        "hello -> ask_id",
        "thanks -> bye",
    ]


def test_majority_beats_the_moving_tie_break():
    wrong = Flowchart({("s", "a", "", "x", "a"): 3, ("s", "a", "", "y", "b"): 2})
    assert wrong.rules("s")[0][("a", "")] == ("x", ())  # 3 > 2: x wins, its self-loop is no edge
    tie = Flowchart({("s", "a", "", "x", "a"): 2, ("s", "a", "", "y", "b"): 2})
    assert tie.rules("s")[0][("a", "")] == ("y", ("b",))  # tie: the action that moves on


def test_merge_sums_counts_and_fixes_a_conflict():
    c1 = Flowchart({("s", START, "", "", "a"): 1, ("s", "a", "", "x", "b"): 1})
    c2 = Flowchart({("s", START, "", "", "a"): 2, ("s", "a", "", "y", "b"): 2})
    c3 = Flowchart({("s", "a", "", "x", "c"): 2, ("t", "q", "", "r", END): 1})
    m = Flowchart.merge([c1, c2, c3])
    assert m.counts[("s", START, "", "", "a")] == 3 and m.counts[("s", "a", "", "x", "b")] == 1
    # x: 1 + 2 = 3 against y: 2 (c2 alone would say y)
    assert m.rules("s")[0][("a", "")] == ("x", ("b", "c"))
    assert m.tasks == ("s", "t") and Flowchart.merge([c2]).rules("s")[0][("a", "")][0] == "y"
    assert Flowchart.merge([c1, c2]) == Flowchart.merge([c2, c1])


def test_quality_by_hand():
    gt = M.ground_truth_chart(["refund"])
    assert F.quality(gt, ["refund"]) == {
        "node_coverage": 1.0,
        "edge_precision": 1.0,
        "edge_recall": 1.0,
        "edge_f1": 1.0,
    }
    truth = D.ground_truth("refund")  # 14 edges (START included), 9 intents
    assert len(truth) == 14
    keep = {e: 1 for e in truth if e[1] != "ask_exception"}  # drop a node (1 edge)
    keep[("refund", "thank", "", "goodbye", "thank")] = 5  # a self-loop: never an edge
    keep[("refund", "ask_refund_time", "", "goodbye", END)] = 9  # a wrong action wins its step
    q = F.quality(Flowchart(keep), ["refund"])
    # 13 of 14 edges kept, ask_refund_time's right edge replaced by a wrong one: 12 right of 13
    assert q["node_coverage"] == pytest.approx(8 / 9)
    assert q["edge_precision"] == pytest.approx(12 / 13)
    assert q["edge_recall"] == pytest.approx(12 / 14)


def test_merged_client_flowcharts_recall_more_than_each():
    charts = []
    for k in range(2):
        ds = D.private_dialogues(["hotel_booking"], 12, 40 + k, 0.3, 0.1)
        sel = S.select([d.labels() for d in ds], [d.cost for d in ds], "lp", k)
        charts.append(F.construct([ds[j] for j in sel]))
    merged = F.quality(Flowchart.merge(charts), ["hotel_booking"])
    each = [F.quality(c, ["hotel_booking"]) for c in charts]
    assert merged["edge_recall"] >= max(q["edge_recall"] for q in each)
    assert merged["node_coverage"] == 1.0


def test_wire_form_round_trips():
    chart = F.construct([DIA1, DIA2])
    assert Flowchart.from_json(chart.to_json()) == chart


# ---------------------------------------------------------------------------- dialogues
def test_synthetic_dialogues_follow_the_chart_and_are_seeded():
    gt = M.ground_truth_chart(D.TASKS)
    syn = M.synthesize(gt, ["refund", "account_reset"], 4, seed=1)
    assert syn == M.synthesize(gt, ["refund", "account_reset"], 4, seed=1)
    assert [d.task for d in syn] == ["refund"] * 4 + ["account_reset"] * 4
    for d in syn:
        rules, _ = D.rules_of(d.task)
        assert all(rules[(t.intent, t.db)][0] == t.action for t in d.turns)
    # a chart without a task gives no dialogue of it
    assert M.synthesize(M.ground_truth_chart(["refund"]), ["hotel_booking"], 3, 0) == []


def test_prompt_with_and_without_the_flowchart():
    s = M.State("refund", "inform_reason", "because it broke", "eligible=no", "request_reason")
    guided = M.prompt(s, "a -> b")
    assert guided == (
        "Service: refund\nFlowchart:\na -> b\nPrevious: request_reason\n"
        "User: because it broke\nDB: eligible=no\nAction:"
    )
    assert M.prompt(s, None) == guided.replace("Flowchart:\na -> b\n", "")


GOALS = M.test_goals(D.TASKS, 6, seed=9)


def test_scripted_perfect_policy_succeeds():
    perfect = M.oracle_policy(M.ground_truth_chart(D.TASKS))
    res = M.simulate(perfect, GOALS, noise=0.3)
    assert res["success"] == res["inform"] == 1.0
    assert res["turns"] == pytest.approx(np.mean([len(g.path) for g in GOALS]))
    assert M.action_accuracy(perfect, GOALS, 0.3) == 1.0


def test_broken_policies_fail():
    res = M.simulate(lambda b: ["goodbye"] * len(b), GOALS, noise=0.3)
    assert res["success"] == res["inform"] == 0.0
    # a policy that ignores the database: always the first branch's action at the branch step
    gt = M.ground_truth_chart(D.TASKS)
    perfect = M.oracle_policy(gt)

    def no_db(batch):
        first = {t: sorted(D.db_values(t))[0] for t in D.TASKS}
        return perfect(
            [
                M.State(s.task, s.intent, s.text, first[s.task] if s.db else "", s.prev)
                for s in batch
            ]
        )

    res = M.simulate(no_db, GOALS, noise=0.3, extra_turns=2)
    wrong_branch = np.mean(
        [any(c and c != sorted(D.db_values(g.task))[0] for _, c, _ in g.path) for g in GOALS]
    )
    assert res["inform"] == pytest.approx(1 - wrong_branch)
    assert 0 < res["success"] < 1 and res["success"] <= res["inform"]


def test_a_missing_step_costs_success_not_inform():
    gt = M.ground_truth_chart(D.TASKS)
    perfect = M.oracle_policy(gt)

    def forgets_goodbye(batch):
        return ["" if a == "goodbye" else a for a in perfect(batch)]

    res = M.simulate(forgets_goodbye, GOALS, noise=0.0)
    assert res["inform"] == 1.0 and res["success"] == 0.0
    assert res["turns"] == pytest.approx(np.mean([len(g.path) + 2 for g in GOALS]))


# ---------------------------------------------------------------------------- the tiny student
def test_word_tokenizer_keeps_every_annotation_one_token():
    from tofdistill.words import WordTokenizer, split

    tok = WordTokenizer()
    for task in D.TASKS:
        for word in (task, *D.actions(task), *D.db_values(task)):
            ids = tok.encode(word)
            assert len(ids) == 1 and ids[0] > tok.UNK and tok.decode(ids) == word
    assert split("Order #12, it's ask_2fa -> x") == [
        "order", "#", "1", "2", ",", "it", "'", "s", "ask_2fa", "-", ">", "x",
    ]  # fmt: skip
    # a misspelt word of the user noise is unknown; decoding stops at the end of sequence
    assert tok.encode("pacakge") == [tok.UNK]
    assert tok.decode([*tok.encode("request_email goodbye"), tok.EOS, 5]) == "request_email goodbye"


class _FixedLM:
    """A fake causal LM: every position's logits are ``row`` (so log p of token ``v`` is
    ``log_softmax(row)[v]`` everywhere)."""

    def __init__(self, row):
        import torch

        self.row = torch.tensor(row, dtype=torch.float32)

    def __call__(self, input_ids, attention_mask):
        from types import SimpleNamespace

        n, t = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(n, t, len(self.row)).clone())


def test_target_logprobs_sum_the_target_and_eos_by_hand():
    from tofdistill import task

    c = task.codec("tiny")
    v = c.vocab_size
    uniform = task.target_logprobs(
        _FixedLM([0.0] * v), c, [("User: hi\nAction:", " goodbye")], "cpu"
    )
    # two scored tokens (the action word, the end of sequence), each log(1/V); the prompt is not
    assert uniform[0] == pytest.approx(-2 * math.log(v))
    row = [0.0] * v
    row[c.encode("goodbye")[0]] = math.log(3.0)  # p(goodbye) = 3 / (V + 2), p(eos) = 1 / (V + 2)
    lp = task.target_logprobs(_FixedLM(row), c, [("a", " goodbye"), ("a", " request_email")], "cpu")
    z = v + 2
    assert lp[0] == pytest.approx(math.log(3 / z) + math.log(1 / z), abs=1e-5)
    assert lp[1] == pytest.approx(2 * math.log(1 / z), abs=1e-5)


def test_score_policy_takes_the_most_likely_action_of_the_service():
    from tofdistill import task

    cfg = task.parse_config({"model": "tiny", "decode": "score"})
    c = task.codec("tiny")
    row = [0.0] * c.vocab_size
    row[c.encode("inform_price")[0]] = 2.0
    state = M.State("hotel_booking", "ask_price", "what is the price", "", "offer_hotel")
    pol = task.lm_policy(cfg, _FixedLM(row), lambda t: None)
    assert pol([state]) == ["inform_price"]
    # an action of another service is never a candidate, however likely
    other = M.State("refund", "ask_refund_time", "when", "", "confirm_refund")
    assert pol([other, state])[0] in D.actions("refund")
    # ties: the first action in sorted order
    assert task.lm_policy(cfg, _FixedLM([0.0] * c.vocab_size), lambda t: None)([other]) == [
        D.actions("refund")[0]
    ]


class _BigramLM:
    """A fake causal LM whose logits at position ``t`` are ``table[input_ids[t]]``: the next
    token depends on the current one, so scoring the wrong position is visible."""

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def test_target_logprobs_score_each_token_from_the_one_before():
    import torch
    from tofdistill import task

    c = task.codec("tiny")
    v = c.vocab_size
    (a,), (bye,), (req,) = c.encode("a"), c.encode("goodbye"), c.encode("request_email")
    table = torch.zeros(v, v)
    table[a, bye] = math.log(3.0)  # after "a": p(goodbye) = 3 / (V + 2)
    table[bye, c.eos] = math.log(3.0)  # after "goodbye": p(eos) = 3 / (V + 2)
    table[req, req] = math.log(3.0)  # a token predicting itself (a shift error would score it)
    z = v + 2
    lp = task.target_logprobs(
        _BigramLM(table), c, [("a", " goodbye"), ("a", " request_email")], "cpu"
    )
    assert lp[0] == pytest.approx(2 * math.log(3 / z), abs=1e-5)
    assert lp[1] == pytest.approx(2 * math.log(1 / z), abs=1e-5)


class _Generator:
    """A fake LM that always generates ``words`` then the end of sequence, and whose scores
    (uniform but for ``liked``) would pick another action."""

    def __init__(self, c, words, liked):
        import torch

        self.c, self.words = c, words
        self.row = torch.zeros(c.vocab_size)
        self.row[c.encode(liked)[0]] = 5.0

    def __call__(self, input_ids, attention_mask):
        from types import SimpleNamespace

        n, t = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(n, t, len(self.row)).clone())

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        import torch

        new = (self.c.encode(self.words) + [self.c.eos] * max_new_tokens)[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new] * len(input_ids))], 1)


def test_decode_generate_reads_the_first_generated_word_and_score_ranks():
    from tofdistill import task

    c = task.codec("tiny")
    state = M.State("refund", "ask_refund_time", "when", "", "confirm_refund")
    lm = _Generator(c, "inform_refund_time goodbye", liked="confirm_refund")
    gen = task.lm_policy(task.parse_config({"model": "tiny"}), lm, lambda t: None)
    assert gen([state, state]) == ["inform_refund_time"] * 2
    score = task.lm_policy(
        task.parse_config({"model": "tiny", "decode": "score"}), lm, lambda t: None
    )
    assert score([state]) == ["confirm_refund"]


def test_table_cells_resume_only_finished_runs(tmp_path):
    import json

    from tofdistill.table import cells, complete

    got = cells(["tof-fed", "pooled-raw"], [0, 1], tmp_path)
    assert [c.name for _, _, c in got] == [
        "tof-fed-s0",
        "pooled-raw-s0",
        "tof-fed-s1",
        "pooled-raw-s1",
    ]
    done, killed, empty = (got[0][2], got[1][2], got[2][2])
    for d in (done, killed, empty):
        d.mkdir()
    (done / "results.json").write_text(json.dumps({"finished_at": "x", "extra": {}}))
    (killed / "results.json").write_text(json.dumps({"extra": {}}))  # a run killed mid-way
    assert [complete(d) for d in (done, killed, empty)] == [True, False, False]
