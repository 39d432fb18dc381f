"""FedGRPO strategy: advantages, clipping, KL, the loss's denominator, graph selection on a
hand-made graph, reply validation, and rounds on a test grid with mock clients (no Ray)."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from flowerbed.common.protocol import Protocol
from flowerbed.common.testing import FakeGrid, mock_reply
from flowerbed.strategies.fedgrpo import (
    AuxSet,
    FedGRPO,
    FedGRPOError,
    agreement,
    check_rewards,
    group_advantages,
    grpo_loss,
    nearest_domain,
    per_token_kl,
    random_experts,
    top_experts,
)


# ---------------------------------------------------------------------------- advantages
def test_group_advantage_by_hand():
    # r = [1, 0, 0, 0]: mean 0.25; unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    np.testing.assert_allclose(group_advantages([1, 0, 0, 0]), [0.75, -0.25, -0.25, -0.25])
    np.testing.assert_allclose(
        group_advantages([1, 0, 0, 0], scale=True, eps=0.0), [1.5, -0.5, -0.5, -0.5]
    )
    np.testing.assert_allclose(
        group_advantages([1, 0, 0, 0], scale=True), np.array([0.75, -0.25, -0.25, -0.25]) / 0.5001
    )
    # equal rewards: no signal (and no division by zero when scaled)
    np.testing.assert_allclose(group_advantages([10, 10, 10, 10], scale=True), 0.0)


# ---------------------------------------------------------------------------- the loss
def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_clipped_surrogate_by_hand():
    old = _t([[0.0, 0.0]])
    # ratio 1.5 (above 1 + 0.3) and 0.5 (below 1 - 0.2), one completion per sign of A
    logp = _t([[math.log(1.5), math.log(0.5)]])
    mask = _t([[1.0, 1.0]])
    pos, st = grpo_loss(logp, old, None, _t([1.0]), mask, beta=0.0)
    # A = +1: min(1.5, 1.3) = 1.3 and min(0.5, 0.8) = 0.5 -> loss -(1.3 + 0.5) / 2
    assert pos.item() == pytest.approx(-0.9)
    assert st["clip_fraction"] == pytest.approx(1.0)
    neg, _ = grpo_loss(logp, old, None, _t([-1.0]), mask, beta=0.0)
    # A = -1: min(-1.5, -1.3) = -1.5 and min(-0.5, -0.8) = -0.8 -> loss (1.5 + 0.8) / 2
    assert neg.item() == pytest.approx(1.15)
    # asymmetric epsilons: 0.2 below, 0.3 above (swapping them changes the value)
    swapped, _ = grpo_loss(logp, old, None, _t([1.0]), mask, eps_low=0.3, eps_high=0.2, beta=0.0)
    assert swapped.item() == pytest.approx(-(1.2 + 0.5) / 2)


def test_gradient_is_zero_outside_the_clip_range_and_not_inside():
    logp = _t([[math.log(1.5), math.log(1.1)]]).requires_grad_(True)
    loss, _ = grpo_loss(logp, _t([[0.0, 0.0]]), None, _t([1.0]), _t([[1.0, 1.0]]), beta=0.0)
    loss.backward()
    # clipped token: no gradient; unclipped: d(-rho A / 2)/dlogp = -1.1 / 2
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-0.55)


def test_kl_term_by_hand():
    # d = log 0.25 - log 0.5 = -log 2: exp(d) - d - 1 = 0.5 + log 2 - 1
    kl = per_token_kl(_t([math.log(0.5)]), _t([math.log(0.25)]))
    assert kl.item() == pytest.approx(math.log(2) - 0.5)
    assert per_token_kl(_t([-1.0]), _t([-1.0])).item() == 0.0
    # the loss adds beta * KL per token: A = 0 leaves only the KL term
    logp, ref = _t([[math.log(0.5)]]), _t([[math.log(0.25)]])
    loss, st = grpo_loss(logp, logp, ref, _t([0.0]), _t([[1.0]]), beta=0.1)
    assert loss.item() == pytest.approx(0.1 * (math.log(2) - 0.5))
    assert st["kl"] == pytest.approx(math.log(2) - 0.5)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, logp, None, _t([0.0]), _t([[1.0]]), beta=0.1)


def test_masked_tokens_are_left_out_of_the_mean():
    # two completions, 3 + 1 real tokens; the denominator is the 4 real tokens (bnpo)
    logp = _t([[math.log(1.1), math.log(1.1), math.log(1.1)], [math.log(0.9), 99.0, 99.0]])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    loss, _ = grpo_loss(logp, torch.zeros_like(logp), None, _t([1.0, 2.0]), mask, beta=0.0)
    assert loss.item() == pytest.approx(-(3 * 1.1 + 2 * 0.9) / 4)


# ---------------------------------------------------------------------------- selection
AUX_Q = ["What is 3 + 4?", "How many grams are in 2 kilograms?", "What day is 2 days after Monday?"]


def test_nearest_domain_and_graph_selection_on_a_hand_made_graph():
    assert nearest_domain("What is 81 x 7?", AUX_Q, [0, 1, 2]) == 0
    assert nearest_domain("How many meters are in 9 kilometers?", AUX_Q, [0, 1, 2]) == 1
    assert nearest_domain("What day is 5 days before Friday?", AUX_Q, [0, 1, 2]) == 2
    # clients x domains: client 3 best at domain 1, then client 0; clients 1 and 2 tie at 0.5
    w = np.array([[0.9, 0.8, 0.1], [0.2, 0.5, 0.9], [0.95, 0.5, 0.2], [0.1, 0.99, 0.3]])
    assert top_experts(w, 1, 2) == [3, 0]
    assert top_experts(w, 1, 3) == [3, 0, 1]  # tie at 0.5: the lower index
    assert top_experts(w, 0, 1) == [2]
    assert top_experts(w, 2, 2) == [1, 3]


def test_agreement_by_hand():
    # domain 0: |10-10|, |2-10| -> 1 - 4/10; domain 1: |2-2| -> 1; domain 2: no item -> 0
    w = agreement([10, 2, 2], [10, 10, 2], [0, 0, 1], 3, 10.0)
    np.testing.assert_allclose(w, [0.6, 1.0, 0.0])


def test_random_selection_is_seeded_and_without_repeats():
    a, b = random_experts(6, 2, 5), random_experts(6, 2, 5)
    assert a == b and len(set(a)) == 2 and all(0 <= i < 6 for i in a)
    draws = {tuple(random_experts(6, 2, s)) for s in range(30)}
    assert len(draws) > 5


# ---------------------------------------------------------------------------- replies
def _rewards_reply(values, **extra):
    content = RecordDict({"rewards": MetricRecord({"r": values}), **extra})
    return mock_reply(content)


def test_a_reply_that_is_not_one_finite_scalar_per_completion_is_rejected():
    assert check_rewards(_rewards_reply([1.0, 2.0, 0.0, 10.0]), 4) is None
    assert check_rewards(_rewards_reply([1.0, 2.0]), 4) == (
        "expected 4 rewards (one per completion), got 2"
    )
    assert check_rewards(_rewards_reply([1.0, float("nan"), 0.0, 1.0]), 4) == (
        "reward 1 is not finite (nan)"
    )
    assert check_rewards(_rewards_reply([1.0, 2.0, float("inf"), 1.0]), 4).startswith("reward 2 ")
    assert check_rewards(_rewards_reply(3.0), 1) == "rewards are not a list of scalars (got float)"
    assert check_rewards(mock_reply(RecordDict()), 4) == "no MetricRecord 'rewards'"
    bad_key = mock_reply(RecordDict({"rewards": MetricRecord({"x": [1.0]})}))
    assert check_rewards(bad_key, 1).startswith("rewards must have the one key 'r'")
    leak = _rewards_reply([1.0], arrays=ArrayRecord({"w": Array(np.zeros(3, np.float32))}))
    assert check_rewards(leak, 1) == "reply carries more than the rewards: arrays"


# ---------------------------------------------------------------------------- rounds
class FakePolicy:
    """Completions ``"<q>#<i>"``; records what update received."""

    def __init__(self):
        self.updates = []

    def generate(self, questions, n, seed):
        return [[f"{q}#{i}" for i in range(n)] for q in questions]

    def update(self, questions, completions, advantages, seed):
        self.updates.append((list(questions), [list(c) for c in completions], advantages))
        return {"loss": 0.5}

    def arrays(self):
        return ArrayRecord({"lora": Array(np.ones(2, np.float32))})


def _exact(q, completions):  # a completion whose index is even is "right"
    return np.array([10.0 if int(c.split("#")[1]) % 2 == 0 else 2.0 for c in completions])


class ScoringGrid(FakeGrid):
    """Routes query and score messages to mock clients: ``domains[pid]`` is a client's domain;
    it scores exactly in its domain and rewards 6 everywhere else. ``bad`` clients reply with
    one NaN reward when scoring (not in the probe)."""

    def __init__(self, domains, bad=()):
        super().__init__([pid + 1 for pid in range(len(domains))])
        self.domains, self.bad, self.sent = domains, set(bad), []

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            pid = node - 1
            if m.metadata.message_type == MessageType.QUERY:
                c = RecordDict({"metrics": MetricRecord({"partition-id": pid})})
                out.append(mock_reply(c, node_id=node, message_type=MessageType.QUERY))
                continue
            self.sent.append((pid, m.content))
            cfg = m.content["config"]
            g = int(cfg["group-size"])
            r = []
            for i, q in enumerate(cfg["questions"]):
                cs = cfg["completions"][i * g : (i + 1) * g]
                dom = nearest_domain(q, AUX_Q, [0, 1, 2])
                r.extend(
                    float(v) for v in (_exact(q, cs) if dom == self.domains[pid] else [6.0] * g)
                )
            if pid in self.bad and int(cfg["server-round"]) > 0:  # scoring, not the probe
                r[0] = float("nan")
            out.append(mock_reply(RecordDict({"rewards": MetricRecord({"r": r})}), node_id=node))
        return out


AUX = AuxSet(
    questions=AUX_Q,
    domains=[0, 1, 2],
    completions=[[f"{q}#0", f"{q}#1"] for q in AUX_Q],
    num_domains=3,
)
ROUND_Q = ["What is 12 x 3?", "What day is 4 days after Sunday?"]


def _run(selection, grid, m=2, **kw):
    policy = FakePolicy()
    s = FedGRPO(
        policy,
        lambda rnd: list(ROUND_Q),
        num_experts=m,
        group_size=4,
        selection=selection,
        scorer=_exact,
        aux=AUX,
        seed=3,
        **kw,
    )
    protocol = Protocol(grid)
    protocol.current_round = 1
    out = s.run_round(protocol, 1, ArrayRecord(), ConfigRecord(), ConfigRecord())
    return s, policy, protocol, out


def test_graph_round_probes_then_routes_each_prompt_to_its_domain_experts():
    grid = ScoringGrid([0, 1, 2, 0, 1, 2])
    s, policy, protocol, out = _run("graph", grid)
    # probe: every client scored the 3 x 2 auxiliary answers; exact in its own domain -> 1
    assert s.graph.shape == (6, 3)
    np.testing.assert_allclose(s.graph[0], [1.0, 0.6, 0.6])  # |6-10|, |6-2| -> 1 - 4/10
    scored = {pid: list(c["config"]["questions"]) for pid, c in grid.sent[6:]}
    assert scored == {0: [ROUND_Q[0]], 3: [ROUND_Q[0]], 2: [ROUND_Q[1]], 5: [ROUND_Q[1]]}
    # every reward exact: advantages are reward - mean over the G * M = 8 completions
    qs, cs, adv = policy.updates[0]
    assert qs == ROUND_Q and [len(c) for c in cs] == [8, 8]
    np.testing.assert_allclose(adv[0], [4.0, -4.0, 4.0, -4.0, 4.0, -4.0, 4.0, -4.0])
    row = s.history[1]
    assert row["reward_error"] == 0.0 and row["floats_up_per_prompt"] == 8
    assert row["bytes_up_per_prompt"] > 0
    assert protocol.rounds[1]["phases"]["score"]["num_replies"] == 4
    assert out.train_metrics["prompts-used"] == 2


def test_random_round_uses_uninformed_experts_and_its_rewards_are_worse():
    _, _, protocol, _ = _run("graph", ScoringGrid([0, 1, 2, 0, 1, 2]))
    s, policy, protocol, _ = _run("random", ScoringGrid([0, 1, 2, 0, 1, 2]))
    assert "probe" not in protocol.rounds[1]["phases"] and s.graph is None
    assert s.history[1]["reward_error"] > 0.0


def test_central_round_sends_nothing_and_scores_every_completion_exactly():
    s, policy, protocol, _ = _run("central", ScoringGrid([0, 1, 2]))
    assert protocol.rounds[1]["bytes_sent"] == protocol.rounds[1]["bytes_received"] == 0
    assert s.history[1]["reward_error"] == 0.0 and s.history[1]["floats_up_per_prompt"] == 0
    assert [len(c) for c in policy.updates[0][1]] == [8, 8]


def test_a_rejected_reply_is_named_and_its_groups_are_dropped():
    grid = ScoringGrid([0, 1, 2, 0, 1, 2], bad={3})
    s, policy, protocol, _ = _run("graph", grid)
    ph = protocol.rounds[1]["phases"]["score"]
    assert ph["num_failures"] == 1
    assert "rejected, reward 0 is not finite (nan)" in ph["failure_reasons"][0]
    assert s.history[1]["groups_dropped"] == 1
    qs, cs, adv = policy.updates[0]
    assert [len(c) for c in cs] == [4, 8]  # prompt 0 keeps only client 0's group
    assert all(np.isfinite(a).all() for a in adv)


def test_too_few_clients_for_the_experts_is_a_named_error():
    with pytest.raises(FedGRPOError, match="1 client"):
        _run("random", ScoringGrid([0]), m=2)
    with pytest.raises(ValueError, match="graph selection needs"):
        FedGRPO(FakePolicy(), lambda r: [], selection="graph")
