"""FedQual strategy with mock replies: reliability weights, calibration reference, checks."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from flowerbed.common.testing import FakeGrid, train_reply
from flowerbed.strategies.fedqual import FedQual, mean_train_metrics, reliability_weights

W = np.zeros((2,), np.float32)


def _configured(**kw) -> tuple[FedQual, list]:
    s = FedQual(min_available_nodes=1, min_train_nodes=1, **kw)
    msgs = list(
        s.configure_train(1, ArrayRecord({"w": Array(W)}), ConfigRecord(), FakeGrid([1, 2]))
    )
    return s, msgs


def _reply(value: float, n: int, q: float, pid: int, alpha: float = 0.0):
    w = np.full((2,), value, np.float32)
    return train_reply(
        {"w": w}, n, node_id=pid + 1, quality=q, alpha=alpha, **{"partition-id": pid}
    )


def test_reliability_weights_hand_computed():
    # n = (100, 300), q = (0.8, 0.2): n*q = (80, 60) -> (4/7, 3/7)
    np.testing.assert_allclose(reliability_weights([100, 300], [0.8, 0.2]), [4 / 7, 3 / 7])
    # power 2: n*q^2 = (64, 12) -> (16/19, 3/19)
    np.testing.assert_allclose(reliability_weights([100, 300], [0.8, 0.2], 2.0), [16 / 19, 3 / 19])
    # power 0 is FedAvg; all-zero quality falls back to FedAvg
    np.testing.assert_allclose(reliability_weights([100, 300], [0.8, 0.2], 0.0), [0.25, 0.75])
    np.testing.assert_allclose(reliability_weights([1, 3], [0.0, 0.0]), [0.25, 0.75])
    with pytest.raises(ValueError):
        reliability_weights([1, 2], [0.5])


def test_aggregate_uses_reliability_not_sample_count():
    s, msgs = _configured(reliability_power=1.0)
    assert all(m.content["config"]["q-ref"] == 0.0 for m in msgs)  # round 1: no anchor yet
    assert all(m.content["config"]["alpha-max"] == 0.5 for m in msgs)
    replies = [_reply(1.0, 100, 0.8, pid=0), _reply(8.0, 300, 0.2, pid=1, alpha=0.3)]
    arrays, metrics = s.aggregate_train(1, replies)
    # weights (4/7, 3/7): 4/7 * 1 + 3/7 * 8 = 28/7 = 4.0 (FedAvg would give 0.25 + 6 = 6.25)
    np.testing.assert_allclose(arrays["w"].numpy(), [4.0, 4.0], rtol=1e-6)
    assert arrays["w"].numpy().dtype == np.float32
    h = s.history[1]
    assert h["quality"] == {"0": 0.8, "1": 0.2}
    np.testing.assert_allclose([h["reliability_weight"][k] for k in "01"], [4 / 7, 3 / 7])
    assert h["alpha"] == {"0": 0.0, "1": 0.3} and h["q_ref"] == 0.0
    # metrics: sample-weighted, no partition id: quality (100*0.8 + 300*0.2) / 400 = 0.35
    assert "partition-id" not in metrics
    assert metrics["quality"] == pytest.approx(0.35)
    # next round broadcasts the best quality as the calibration reference
    msgs = list(s.configure_train(2, arrays, ConfigRecord(), FakeGrid([1, 2])))
    assert all(m.content["config"]["q-ref"] == pytest.approx(0.8) for m in msgs)


def test_ablations_no_weights_and_no_calibration():
    s, msgs = _configured(use_reliability=False, alpha_max=0.0)
    assert all(m.content["config"]["alpha-max"] == 0.0 for m in msgs)
    arrays, _ = s.aggregate_train(1, [_reply(1.0, 100, 0.8, 0), _reply(8.0, 300, 0.2, 1)])
    np.testing.assert_allclose(arrays["w"].numpy(), [6.25, 6.25])  # FedAvg weights


def test_reply_without_valid_quality_is_rejected():
    s, _ = _configured()
    bad = train_reply({"w": np.ones(2, np.float32)}, 50, node_id=3)  # no quality metric
    worse = _reply(9.0, 50, 1.5, pid=2)  # quality outside [0, 1]
    arrays, _ = s.aggregate_train(1, [_reply(2.0, 10, 0.5, 0), bad, worse])
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0])
    reasons = " ".join(s.history[1]["failure_reasons"])
    assert s.history[1]["num_rejected"] == 2 and "quality" in reasons and "1.5" in reasons


def test_mean_train_metrics_drops_partition_id():
    from flwr.app import MetricRecord, RecordDict

    c = [
        RecordDict({"m": MetricRecord({"num-examples": 1, "partition-id": 0, "train_loss": 1.0})}),
        RecordDict({"m": MetricRecord({"num-examples": 3, "partition-id": 4, "train_loss": 3.0})}),
    ]
    out = mean_train_metrics(c, "num-examples")
    assert dict(out) == {"train_loss": 2.5}


def test_invalid_parameters():
    with pytest.raises(ValueError, match="reliability_power"):
        FedQual(reliability_power=-1)
    with pytest.raises(ValueError, match="alpha_max"):
        FedQual(alpha_max=2)


def test_aggregate_power_two_hand_computed():
    # the app's default gamma = 2: n q^2 = (100 * .64, 300 * .04) = (64, 12) -> (16/19, 3/19)
    s, _ = _configured(reliability_power=2.0)
    arrays, _ = s.aggregate_train(1, [_reply(1.0, 100, 0.8, 0), _reply(20.0, 300, 0.2, 1)])
    np.testing.assert_allclose(arrays["w"].numpy(), [76 / 19, 76 / 19], rtol=1e-6)  # 16+60
    np.testing.assert_allclose(
        [s.history[1]["reliability_weight"][k] for k in "01"], [16 / 19, 3 / 19]
    )


def test_q_ref_is_the_best_quality_of_the_previous_round():
    s, _ = _configured()
    s.aggregate_train(
        1, [_reply(1.0, 10, 0.3, 0), _reply(1.0, 10, 0.7, 1), _reply(1.0, 10, 0.5, 2)]
    )
    assert s.q_ref == pytest.approx(0.7) and s.history[1]["q_ref"] == 0.0
    s.aggregate_train(2, [_reply(1.0, 10, 0.4, 0), _reply(1.0, 10, 0.6, 1)])
    # recorded: the reference the clients of round 2 used; then the new best
    assert s.history[2]["q_ref"] == pytest.approx(0.7) and s.q_ref == pytest.approx(0.6)


def test_uniform_alpha_is_sent_only_for_the_uniform_baseline():
    _, msgs = _configured()
    assert all("uniform-alpha" not in m.content["config"] for m in msgs)
    s, msgs = _configured(uniform_alpha=0.3, alpha_max=0.5)
    assert all(m.content["config"]["uniform-alpha"] == pytest.approx(0.3) for m in msgs)
    assert all(m.content["config"]["alpha-max"] == 0.5 for m in msgs)
    assert s.uniform_alpha == 0.3
    with pytest.raises(ValueError, match="uniform_alpha"):
        FedQual(uniform_alpha=1.5)
