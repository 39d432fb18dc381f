"""The shared attack suite (flowerbed.common.attacks): every attack on hand-checkable vectors,
the choice of malicious partitions, the run-config validation, and the strategy wrapper on mock
replies."""

from statistics import NormalDist

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from flowerbed.common import attacks as A
from flowerbed.common import config as C
from flowerbed.common.testing import FakeGrid, mock_reply, train_reply
from flowerbed.strategies.fedavg import FedAvg


def test_sign_flip_is_minus_scale_times_the_update():
    np.testing.assert_allclose(A.sign_flip(np.array([1.0, -2.0, 0.5]), 3.0), [-3.0, 6.0, -1.5])


def test_gaussian_noise_has_the_std_and_is_reproducible():
    a = A.gaussian((20000,), 2.0, np.random.default_rng(7))
    b = A.gaussian((20000,), 2.0, np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert abs(a.std() - 2.0) < 0.05 and abs(a.mean()) < 0.05


def test_lie_z_is_baruch_formula():
    # n = 10, m = 3: s = floor(10/2 + 1) - 3 = 3, z = Phi^-1(7/10)
    assert A.lie_z(10, 3) == pytest.approx(NormalDist().inv_cdf(0.7))
    assert A.lie_z(10, 3) == pytest.approx(0.5244, abs=1e-4)
    # n = 50, m = 12: s = 26 - 12 = 14, z = Phi^-1(36/50)
    assert A.lie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(0.72))
    assert A.lie_z(4, 0) == 0.0  # s = 3, (4-3)/4 < 1/2: no shift


def test_lie_is_mean_minus_z_std():
    ref = np.array([[0.0, 0.0], [2.0, 4.0]])  # mean [1, 2], std [1, 2]
    z = NormalDist().inv_cdf(0.7)
    np.testing.assert_allclose(A.lie(ref, 10, 3), [1 - z, 2 - 2 * z])


def test_ipm_is_minus_epsilon_mean():
    ref = np.array([[1.0, 2.0], [3.0, 6.0]])
    np.testing.assert_allclose(A.ipm(ref, 0.5), [-1.0, -2.0])


def test_min_max_and_min_sum_on_three_points():
    # 1-D reference {0, 1, 5}: mean 2, p = -std. Min-max: max distance to a point <= 5
    # (the largest pairwise distance) -> x >= 0, so x = 0. Min-sum: 3 (x-2)^2 + 14 <= 41
    # (the largest sum of squared distances, that of 5) -> x = 2 - 3 = -1.
    ref = np.array([[0.0], [1.0], [5.0]])
    np.testing.assert_allclose(A.min_max(ref), [0.0], atol=1e-4)
    np.testing.assert_allclose(A.min_sum(ref), [-1.0], atol=1e-4)
    # direction -mean/||mean||: the same bounds along -1
    np.testing.assert_allclose(A.min_max(ref, "unit"), [0.0], atol=1e-4)
    # two points {0, 2}: x = 1 - gamma, max(|x|, |x-2|) <= 2 -> x = 0
    np.testing.assert_allclose(A.min_max(np.array([[0.0], [2.0]])), [0.0], atol=1e-4)


def test_largest_gamma_bisection():
    assert A.largest_gamma(lambda g: g <= 3.3) == pytest.approx(3.3, abs=1e-4)
    assert A.largest_gamma(lambda g: g <= 37.0) == pytest.approx(37.0, abs=1e-4)  # past init
    assert A.largest_gamma(lambda g: False) == 0.0


def test_poisoned_updates_collusion_uses_benign_reference():
    own = np.array([[10.0, 10.0]])
    benign = np.array([[1.0, 2.0], [3.0, 6.0]])
    rng = np.random.default_rng(0)
    with_b = A.poisoned_updates("ipm", own, benign, 3, rng, scale=1.0, collude=True)
    np.testing.assert_allclose(with_b, [[-2.0, -4.0]])
    alone = A.poisoned_updates("ipm", own, benign, 3, rng, scale=1.0, collude=False)
    np.testing.assert_allclose(alone, [[-10.0, -10.0]])
    np.testing.assert_allclose(A.poisoned_updates("sign-flip", own, benign, 3, rng), -own)


def test_label_flip():
    np.testing.assert_array_equal(A.flip_labels(np.array([0, 3, 9]), 10), [9, 6, 0])
    cfg = {**_attack_cfg(fraction=0.5), "attack": "label-flip"}
    y = np.array([0, 1])
    np.testing.assert_array_equal(A.poison_labels(cfg, 0, 4, y, 10), [9, 8])  # pid 0 of 4
    np.testing.assert_array_equal(A.poison_labels(cfg, 2, 4, y, 10), [0, 1])  # benign


def _attack_cfg(**kw):
    cfg = {k: o.default for k, o in C.ATTACK.items()}
    cfg["seed"] = 42
    cfg.update({f"attack-{k}": v for k, v in kw.items()})
    return cfg


def test_malicious_partitions_first_last_random_ids():
    assert A.malicious_partitions(20, 0.3, "first") == [0, 1, 2, 3, 4, 5]
    assert A.malicious_partitions(10, 0.2, "last") == [8, 9]
    r = A.malicious_partitions(20, 0.3, "random", seed=1)
    assert len(r) == 6 and r == A.malicious_partitions(20, 0.3, "random", seed=1)
    assert r != A.malicious_partitions(20, 0.3, "random", seed=2)
    assert A.malicious_partitions(10, 0.0, ids="3,1") == [1, 3]
    assert A.malicious_partitions(10, 0.29, "first") == [0, 1]  # floor


def test_detection_precision_recall():
    assert A.detection([1, 2, 5], [1, 2, 3, 4]) == {"detect_precision": 2 / 3, "detect_recall": 0.5}
    assert A.detection([], [1]) == {"detect_precision": 1.0, "detect_recall": 0.0}


@pytest.mark.parametrize(
    "bad, msg",
    [
        (
            {"attack-fraction": 1.0},
            r"^run config attack-fraction=1.0: malicious fraction in \[0, 1\)$",
        ),
        ({"attack-fraction": -0.1}, r"^run config attack-fraction=-0.1: "),
        ({"attack": "fang"}, r"^run config attack='fang': must be one of none, label-flip, "),
        ({"attack-partitions": "a,b"}, r"^run config attack-partitions='a,b': "),
    ],
)
def test_attack_options_are_validated_in_one_line(bad, msg):
    with pytest.raises(C.ConfigError, match=msg) as e:
        C.parse(bad, C.ATTACK)
    assert "\n" not in str(e.value)


def test_fragment_choices_are_the_attacks():
    assert C.ATTACK["attack"].choices == A.ATTACKS
    with pytest.raises(A.AttackError, match="attack-fraction=1.0"):
        A.Attacked(FedAvg(), "sign-flip", fraction=1.0)


# ---------------------------------------------------------------------------- the wrapper
class QueryGrid(FakeGrid):
    """FakeGrid that answers the partition query: node n holds partition n - 1."""

    def send_and_receive(self, msgs, timeout=None):
        out = []
        for m in msgs:
            n = m.metadata.dst_node_id
            met = MetricRecord({"partition-id": n - 1, "num-partitions": len(self.node_ids)})
            out.append(
                mock_reply(RecordDict({"metrics": met}), node_id=n, message_type=MessageType.QUERY)
            )
        return out


def _run_round(attack, nodes=(1, 2, 3, 4), **kw):
    """One train round of flowerbed's FedAvg under ``attack``: (aggregate, wrapper)."""
    strat = A.Attacked(FedAvg(min_train_nodes=1, min_available_nodes=1), attack, seed=3, **kw)
    glob = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    grid = QueryGrid(list(nodes))
    list(strat.configure_train(1, glob, ConfigRecord({}), grid))
    updates = {1: [1.0, 1.0], 2: [1.0, 2.0], 3: [3.0, 6.0], 4: [2.0, 4.0]}
    replies = [train_reply({"w": np.float32(updates[n])}, 10, node_id=n) for n in nodes]
    arrays, _ = strat.aggregate_train(1, replies)
    return arrays["w"].numpy(), strat


def test_wrapper_sign_flip_replaces_the_malicious_reply():
    # partitions 0 (node 1) malicious: the mean of (-1, -1), (1, 2), (3, 6), (2, 4)
    agg, strat = _run_round("sign-flip", fraction=0.25)
    np.testing.assert_allclose(agg, [(-1 + 1 + 3 + 2) / 4, (-1 + 2 + 6 + 4) / 4])
    row = strat.history[1]
    assert row["malicious_nodes"] == [1] and row["malicious_partitions"] == [0]
    assert row["num_train_replies"] == 4  # the inner FedAvg's row is kept


def test_wrapper_ipm_colludes_with_the_benign_updates():
    # nodes 1, 2 malicious (fraction 0.5): both send -mean(benign) = -(2.5, 5)
    agg, strat = _run_round("ipm", fraction=0.5)
    np.testing.assert_allclose(agg, [(-2.5 * 2 + 3 + 2) / 4, (-5 * 2 + 6 + 4) / 4])
    assert strat.history[1]["malicious_nodes"] == [1, 2]


def test_wrapper_no_attack_and_label_flip_leave_replies_alone():
    for attack in ("label-flip", "none"):
        agg, _ = _run_round(attack, fraction=0.5)
        np.testing.assert_allclose(agg, [7 / 4, 13 / 4])


def test_wrapper_gaussian_is_reproducible_from_seed_and_round():
    a, _ = _run_round("gaussian", fraction=0.25, scale=5.0)
    b, _ = _run_round("gaussian", fraction=0.25, scale=5.0)
    assert np.array_equal(a, b)
    assert not np.allclose(a, [7 / 4, 13 / 4])


def test_wrapper_reports_detection_of_a_defence():
    class Rejecting(FedAvg):
        def aggregate_train(self, server_round, replies):
            out = super().aggregate_train(server_round, replies)
            self.history[server_round]["rejected_nodes"] = [1, 3]
            return out

    strat = A.Attacked(Rejecting(min_train_nodes=1, min_available_nodes=1), "sign-flip", 0.5)
    grid = QueryGrid([1, 2, 3, 4])
    glob = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    list(strat.configure_train(1, glob, ConfigRecord({}), grid))
    strat.aggregate_train(
        1, [train_reply({"w": np.ones(2, np.float32)}, 5, node_id=n) for n in (1, 2, 3, 4)]
    )
    row = strat.history[1]
    assert row["detect_precision"] == 0.5 and row["detect_recall"] == 0.5


def test_wrapper_around_flowers_median():
    from flwr.serverapp.strategy import FedMedian

    # 3 clients, fraction 0.34: floor(1.02) = 1 attacker, partition 0 (node 1)
    strat = A.Attacked(FedMedian(min_train_nodes=1, min_available_nodes=1), "sign-flip", 0.34)
    grid = QueryGrid([1, 2, 3])
    glob = ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
    msgs = list(strat.configure_train(1, glob, ConfigRecord({}), grid))
    assert len(msgs) == 3 and isinstance(msgs[0], Message)
    reps = [
        train_reply({"w": np.float32([v])}, 5, node_id=n) for n, v in ((1, 4.0), (2, 1.0), (3, 2.0))
    ]
    arrays, _ = strat.aggregate_train(1, reps)
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0])  # median of (-4, 1, 2)
