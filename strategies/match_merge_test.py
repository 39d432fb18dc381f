"""Match-and-merge strategy: CER, rescoring and merges by hand, GMMA and RMMA on a hand-made
instance, evaluation counting, reply validation and a round on a test grid (no Ray)."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from flowerbed.common.protocol import Protocol
from flowerbed.common.testing import FakeGrid, mock_reply
from flowerbed.strategies.match_merge import (
    Candidate,
    DevScorer,
    Evaluations,
    Genome,
    MatchMerge,
    MatchMergeError,
    NBestSet,
    cer,
    check_lm_reply,
    crossover,
    edit_distance,
    effective_weights,
    gmma,
    merge_tables,
    mutate,
    order_crossover,
    rescore,
    rmma,
    tournament,
    uniform_lm,
)


# ---------------------------------------------------------------------------- CER
@pytest.mark.parametrize(
    "a, b, d",
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("ab", "ba", 2),
        ("flaw", "lawn", 2),  # -f, +n
        ("the cat", "the at", 1),
    ],
)
def test_edit_distance_by_hand(a, b, d):
    assert edit_distance(a, b) == d
    assert edit_distance(b, a) == d


def test_cer_is_edits_over_reference_characters():
    # 1 substitution in "abcd", 1 deletion in "xy": 2 edits / 6 reference characters
    assert cer(["abcd", "xy"], ["abed", "x"]) == pytest.approx(2 / 6)
    # dividing by the hypotheses' 5 characters would give 0.4
    assert cer(["abcd", "xy"], ["abed", "x"]) != pytest.approx(2 / 5)
    with pytest.raises(ValueError):
        cer(["a"], [])


def _nbest(refs, hyps, am, domains=None, names=("d0", "d1")):
    n = max(len(h) for h in hyps)
    pad = np.full((len(refs), n), -np.inf)
    for i, row in enumerate(am):
        pad[i, : len(row)] = row
    doms = np.zeros(len(refs), dtype=int) if domains is None else domains
    return NBestSet(list(refs), [list(h) for h in hyps], pad, doms, names)


def test_nbest_cer_per_domain_and_oracle():
    nb = _nbest(
        ["abcd", "xy", "hello"],
        [["abcd", "abce"], ["x", "xy", "xz"], ["hallo"]],
        [[0, 0], [0, 0, 0], [0]],
        domains=np.array([0, 0, 1]),
    )
    got = nb.cer_of(np.array([1, 0, 0]))
    # domain 0: (1 + 1) / (4 + 2); domain 1: 1 / 5; all: 3 / 11
    assert got == pytest.approx({"all": 3 / 11, "d0": 2 / 6, "d1": 1 / 5})
    assert nb.oracle() == pytest.approx({"all": 1 / 11, "d0": 0.0, "d1": 1 / 5})
    assert nb.valid.tolist() == [[True, True, False], [True, True, True], [True, False, False]]


# ---------------------------------------------------------------------------- rescoring
def test_rescoring_picks_the_hypothesis_the_lm_prefers():
    am = np.array([[-1.0, -2.0, -np.inf]])
    lm = np.array([[-10.0, -5.0, 0.0]])
    length = np.array([[3.0, 3.0, 0.0]])
    # -1 - 10 = -11 against -2 - 5 = -7: the second; the padding (am = -inf) never wins
    assert rescore(am, lm, length, alpha=1.0, beta=0.0).tolist() == [1]
    assert rescore(am, lm, length, alpha=0.0, beta=0.0).tolist() == [0]  # acoustic 1-best
    # beta rewards length: -4 + 1.5 * 2 = -1 against -6 + 1.5 * 4 = 0
    am2, lm2, len2 = np.zeros((1, 2)), np.array([[-4.0, -6.0]]), np.array([[2.0, 4.0]])
    assert rescore(am2, lm2, len2, alpha=1.0, beta=1.5).tolist() == [1]
    assert rescore(am2, lm2, len2, alpha=1.0, beta=0.0).tolist() == [0]


# ---------------------------------------------------------------------------- merges
def test_effective_weights_are_on_the_simplex():
    w = effective_weights(Candidate((2, 0, 1), (0.5, 0.25)), 4)
    # [2] -> 0.5 [2] + 0.5 [0] -> 0.25 (0.5 [2] + 0.5 [0]) + 0.75 [1]
    np.testing.assert_allclose(w, [0.125, 0.75, 0.125, 0.0])
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert effective_weights(Candidate(()), 3).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        Candidate((0, 1), ())  # one weight per merge step
    with pytest.raises(ValueError):
        Candidate((0, 0), (0.5,))  # an LM twice


def _tables(*probs):
    return np.log(np.array([[[p]] for p in probs], dtype=np.float64))  # (K, U=1, N=1, T)


def test_same_type_merge_is_linear_interpolation_per_token():
    t = _tables([0.5, 0.2], [0.1, 0.4])
    got = merge_tables(t, ["ngram", "ngram"], Candidate((0, 1), (0.25,)))
    # 0.25 * 0.5 + 0.75 * 0.1 = 0.2 ; 0.25 * 0.2 + 0.75 * 0.4 = 0.35
    np.testing.assert_allclose(np.exp(got[0, 0]), [0.2, 0.35])


def test_mixed_type_merge_is_log_linear():
    t = _tables([0.5, 0.2], [0.1, 0.4])
    got = merge_tables(t, ["ngram", "neural"], Candidate((0, 1), (0.25,)))
    want = 0.25 * np.log([0.5, 0.2]) + 0.75 * np.log([0.1, 0.4])
    np.testing.assert_allclose(got[0, 0], want)
    # once a neural LM is in, a later n-gram is combined log-linearly too
    t3 = _tables([0.5], [0.1], [0.8])
    got3 = merge_tables(t3, ["ngram", "neural", "ngram"], Candidate((0, 1, 2), (0.5, 0.5)))
    np.testing.assert_allclose(
        got3[0, 0], 0.5 * (0.5 * np.log(0.5) + 0.5 * np.log(0.1)) + 0.5 * np.log(0.8)
    )
    # two n-grams first (linear), then the neural one (log-linear)
    got4 = merge_tables(t3, ["ngram", "neural", "ngram"], Candidate((0, 2, 1), (0.5, 0.5)))
    np.testing.assert_allclose(got4[0, 0], 0.5 * np.log(0.65) + 0.5 * np.log(0.1))


def test_uniform_interpolation_and_empty_candidate():
    t = _tables([0.5, 0.2], [0.1, 0.4], [0.3, 0.3])
    np.testing.assert_allclose(np.exp(uniform_lm(t)[0, 0]), [0.3, 0.3])
    assert merge_tables(t, ["ngram"] * 3, Candidate(())).tolist() == [[[0.0, 0.0]]]


def test_dev_scorer_rescores_with_the_merged_lm():
    # one utterance, two hypotheses, equal acoustic scores; LM 0 prefers the right one, LM 1
    # the wrong one more strongly: alone LM 1 picks the wrong, the 0.75/0.25 mix the right one
    nb = _nbest(["ab"], [["ab", "ax"]], [[0.0, 0.0]])
    t = np.log(
        np.array([[[[0.9, 1.0, 1.0], [0.1, 1.0, 1.0]]], [[[0.4, 1.0, 1.0], [0.6, 1.0, 1.0]]]])
    )
    dev = DevScorer(nb, t, ["ngram", "ngram"], alpha=1.0, beta=0.0)
    assert dev(Candidate((0,))) == 0.0
    assert dev(Candidate((1,))) == pytest.approx(0.5)
    assert dev(Candidate((0, 1), (0.75,))) == 0.0  # 0.775 vs 0.225
    assert dev(Candidate((0, 1), (0.1,))) == pytest.approx(0.5)  # 0.45 vs 0.55
    with pytest.raises(MatchMergeError):
        DevScorer(nb, t[:, :, :1], ["ngram", "ngram"], 1.0, 0.0)


# ---------------------------------------------------------------------------- evaluations
def test_evaluations_count_distinct_candidates_and_convergence():
    values = {(0,): 0.5, (1,): 0.3, (2,): 0.2995, (3,): 0.4}
    ev = Evaluations(lambda c: values[c.order], budget=3)
    for k in (0, 1, 0, 2):
        ev(Candidate((k,)))
    assert ev.count == 3 and ev.best == [0.5, 0.3, 0.2995] and ev.exhausted
    assert ev.best_candidate == Candidate((2,))
    assert ev.to_converge(1e-3) == 2  # 0.3 is within 0.001 of the final 0.2995
    assert ev.to_converge(1e-4) == 3


# ---------------------------------------------------------------------------- GMMA / RMMA
TARGET = Candidate((2, 0, 3), (0.7, 0.4))


def toy_fitness(c: Candidate) -> float:
    """0 only at TARGET: position mismatches, length difference and weight distance."""
    miss = sum(a != b for a, b in zip(c.order, TARGET.order, strict=False))
    dw = sum(abs(a - b) for a, b in zip(c.weights, TARGET.weights, strict=False))
    return miss + abs(len(c.order) - len(TARGET.order)) + dw + 0.5 * len(c.weights[2:])


def test_gmma_finds_the_optimum_of_a_hand_made_instance():
    ev = Evaluations(toy_fitness)
    best = gmma(ev, 5, seed=0, population=20, generations=40)
    assert best.order == TARGET.order
    np.testing.assert_allclose(best.weights, TARGET.weights, atol=0.05)
    assert 20 < ev.count <= 20 * 40
    again = Evaluations(toy_fitness)
    assert gmma(again, 5, seed=0, population=20, generations=40) == best  # seeded
    assert again.best == ev.best


RL = {"episodes": 400, "lr": 0.2, "am_only": 5.0, "reward_scale": 1.0}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rmma_finds_the_optimum_of_a_hand_made_instance(seed):
    ev = Evaluations(toy_fitness, budget=600)
    best = rmma(ev, 5, seed=seed, **RL)
    assert best == TARGET and ev.best[-1] == 0.0
    assert ev.count <= 600
    again = Evaluations(toy_fitness, budget=600)
    assert rmma(again, 5, seed=seed, **RL) == best  # seeded
    assert again.best == ev.best


@pytest.mark.parametrize("seed", [0, 1])
def test_rmma_learns_a_policy_better_than_chance(seed):
    """With learning off (lr ~ 0) the policy stays uniform and misses the optimum within the
    same episodes; REINFORCE finds it (a sign flip in the update drives the policy away)."""
    blind = Evaluations(toy_fitness, budget=600)
    rmma(blind, 5, seed=seed, **{**RL, "lr": 1e-9})
    assert blind.best[-1] > 0.1


def test_rmma_and_gmma_respect_the_budget():
    ev = Evaluations(toy_fitness, budget=25)
    gmma(ev, 5, 3)
    assert ev.count == 25
    ev = Evaluations(toy_fitness, budget=25)
    rmma(ev, 5, 3, **RL)
    assert ev.count == 25


def test_genetic_operators_keep_valid_genomes():
    rng = np.random.default_rng(0)
    a = Genome((0, 1, 2, 3, 4), 3, (0.1, 0.2, 0.3, 0.4))
    b = Genome((4, 3, 2, 1, 0), 5, (0.9, 0.8, 0.7, 0.6))
    for _ in range(50):
        c = mutate(crossover(a, b, rng), 0.5, rng)
        assert sorted(c.perm) == [0, 1, 2, 3, 4] and 1 <= c.length <= 5
        assert all(0.05 <= w <= 0.95 for w in c.weights)
        c.candidate()
    # order crossover keeps a slice of the first parent in place
    child = order_crossover((0, 1, 2, 3), (3, 2, 1, 0), np.random.default_rng(3))
    assert sorted(child) == [0, 1, 2, 3]
    # the tournament returns the fittest (lowest) entrant; with all entrants, the best
    assert tournament([0.3, 0.1, 0.2], 3, rng) == 1


# ---------------------------------------------------------------------------- replies
class ToyLM:
    kind = "ngram"

    def __init__(self, probs: dict, name="toy"):
        self.probs, self.name = probs, name

    def table(self, texts, t_max):
        out = np.zeros((len(texts), t_max))
        for i, t in enumerate(texts):
            out[i, 0] = math.log(self.probs.get(t, 0.01))
        return out


def _upload(pid: int, node: int, good: str, kind: int = 0, arrays=None, **extra):
    arrays = arrays if arrays is not None else {"good": np.array([ord(c) for c in good], float)}
    meta = MetricRecord({"partition-id": pid, "lm-kind": kind, **extra})
    rec = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return mock_reply(RecordDict({"lm": rec, "metrics": meta}), node_id=node)


def _load(arrays, meta):
    good = "".join(chr(int(x)) for x in arrays["good"].numpy())
    if good == "boom":
        raise ValueError("wrong shape")
    return ToyLM({good: 0.9})


def test_check_lm_reply_names_each_problem():
    assert check_lm_reply(_upload(0, 1, "ab")) is None
    assert "no ArrayRecord 'lm'" in check_lm_reply(mock_reply(RecordDict()))
    bad = _upload(0, 1, "ab", arrays={"x": np.array([1.0, np.nan])})
    assert check_lm_reply(bad) == "array 'x' is not finite"
    assert "lm-kind" in check_lm_reply(_upload(0, 1, "ab", kind=7))
    no_pid = mock_reply(
        RecordDict(
            {"lm": ArrayRecord({"a": Array(np.ones(2))}), "metrics": MetricRecord({"lm-kind": 0})}
        )
    )
    assert check_lm_reply(no_pid) == "metric 'partition-id' missing"


class UploadGrid(FakeGrid):
    """Each node answers an upload with the reply ``replies[node]`` makes."""

    def __init__(self, replies):
        super().__init__(sorted(replies))
        self.replies = replies

    def send_and_receive(self, messages, timeout=None):
        return [self.replies[m.metadata.dst_node_id]() for m in messages]


def test_a_round_keeps_valid_uploads_and_rejects_malformed_ones():
    # three utterances with two hypotheses each; LM "right" prefers every reference
    refs = ["aa", "bb", "cc"]
    hyps = [["aa", "ax"], ["bx", "bb"], ["cc", "cx"]]
    am = [[0.0, 0.1], [0.1, 0.0], [0.0, 0.1]]  # acoustic 1-best: ax, bx, cx -> 3 edits
    nb = _nbest(refs, hyps, am, domains=np.array([0, 1, 1]))
    grid = UploadGrid(
        {
            1: lambda: _upload(0, 1, "aa"),
            2: lambda: _upload(1, 2, "bb"),
            3: lambda: _upload(2, 3, "boom"),  # the loader refuses it
            4: lambda: _upload(3, 4, "cc", arrays={"good": np.array([np.inf])}),
            5: lambda: _upload(0, 5, "cc"),  # partition 0 twice
        }
    )
    strat = MatchMerge("best-single", _load, nb, nb, alpha=1.0, beta=0.0, min_nodes=5)
    out = strat.run_round(Protocol(grid), 1, ArrayRecord(), None, None)
    row = strat.history[1]
    assert row["uploads_kept"] == 2 and row["uploads_rejected"] == 3
    assert [lm["partition"] for lm in row["lms"]] == [0, 1]
    m = out.server_metrics
    # best single: LM of partition 0 fixes "aa"; LM of partition 1 fixes "bb" (equal dev CER:
    # 2 edits / 6 chars each; the first index wins)
    assert row["matching"] == [0]
    assert m["cer"] == pytest.approx(2 / 6) and m["evaluations"] == 2
    assert m["cer-d0"] == 0.0 and m["cer-d1"] == pytest.approx(2 / 4)
    am_only = MatchMerge("am-only", _load, nb, nb, alpha=1.0, beta=0.0, min_nodes=5)
    assert am_only.run_round(Protocol(grid), 1, ArrayRecord(), None, None).server_metrics[
        "cer"
    ] == pytest.approx(3 / 6)
    uni = MatchMerge("uniform", _load, nb, nb, alpha=1.0, beta=0.0, min_nodes=5)
    # the uniform mix of the two LMs prefers "aa" and "bb" over the 0.01 ones: 1 edit left
    assert uni.run_round(Protocol(grid), 1, ArrayRecord(), None, None).server_metrics[
        "cer"
    ] == pytest.approx(1 / 6)


def test_a_round_without_valid_upload_stops_with_a_named_error():
    grid = UploadGrid({1: lambda: _upload(0, 1, "boom")})
    nb = _nbest(["aa"], [["aa"]], [[0.0]])
    strat = MatchMerge("rmma", _load, nb, nb, alpha=1.0, beta=0.0)
    with pytest.raises(MatchMergeError, match="no valid LM uploaded"):
        strat.run_round(Protocol(grid), 1, ArrayRecord(), None, None)
