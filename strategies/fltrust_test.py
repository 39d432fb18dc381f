"""FLTrust on crafted replies: trust scores, norm rescaling, weight 0 for an opposite update."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from flowerbed.common.testing import FakeGrid, mock_reply, train_reply
from flowerbed.strategies.fltrust import FLTrust, FLTrustError, fltrust_update, trust_weights


def test_trust_is_relu_cosine():
    g0 = np.array([1.0, 0.0])
    ups = np.array([[2.0, 0.0], [1.0, 1.0], [-3.0, 0.0], [0.0, 5.0]])
    np.testing.assert_allclose(trust_weights(ups, g0), [1.0, 1 / np.sqrt(2), 0.0, 0.0])


def test_update_is_rescaled_to_g0_and_trust_weighted():
    g0 = np.array([0.0, 2.0])  # ||g0|| = 2
    ups = np.array([[0.0, 10.0], [3.0, 4.0], [0.0, -7.0]])
    delta, ts = fltrust_update(ups, g0)
    np.testing.assert_allclose(ts, [1.0, 0.8, 0.0])
    # rescaled: (0, 2) and (1.2, 1.6); weighted (1 * (0, 2) + 0.8 * (1.2, 1.6)) / 1.8
    np.testing.assert_allclose(delta, [(0.8 * 1.2) / 1.8, (2 + 0.8 * 1.6) / 1.8])


def test_every_trust_zero_gives_a_zero_update():
    delta, ts = fltrust_update(np.array([[-1.0, 0.0]]), np.array([1.0, 0.0]))
    assert ts.tolist() == [0.0] and delta.tolist() == [0.0, 0.0]


def _strategy(g0):
    glob = ArrayRecord({"w": Array(np.array([1.0, 1.0], dtype=np.float32))})

    def server_update(rnd, arrays):
        return ArrayRecord({"w": Array((arrays["w"].numpy() + np.float32(g0)).astype(np.float32))})

    s = FLTrust(server_update, min_train_nodes=1, min_available_nodes=1)
    list(s.configure_train(1, glob, ConfigRecord({}), FakeGrid([1, 2, 3])))
    return s


def test_strategy_on_replies_opposite_gets_weight_zero_and_is_rejected():
    s = _strategy([0.0, 1.0])
    reps = [
        train_reply({"w": np.float32([1.0, 101.0])}, 10, node_id=1),  # huge, same direction
        train_reply({"w": np.float32([1.0, -50.0])}, 10, node_id=2),  # opposite: trust 0
        train_reply({"w": np.float32([2.0, 1.0])}, 10, node_id=3),  # orthogonal: trust 0
        mock_reply(node_id=4, error="boom"),
    ]
    arrays, _ = s.aggregate_train(1, reps)
    # only node 1 counts, its update (0, 100) rescaled to ||g0|| = 1
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 2.0])
    row = s.history[1]
    assert row["rejected_nodes"] == [2, 3] and row["num_failures"] == 1
    assert row["trust_scores"]["1"] == 1.0


def test_all_rejected_keeps_the_model_and_zero_g0_is_an_error():
    s = _strategy([0.0, 1.0])
    arrays, _ = s.aggregate_train(1, [train_reply({"w": np.float32([1.0, 0.0])}, 5, node_id=1)])
    assert arrays is None and s.history[1]["rejected_nodes"] == [1]
    s = _strategy([0.0, 0.0])
    with pytest.raises(FLTrustError, match="g_0 is zero"):
        s.aggregate_train(1, [train_reply({"w": np.float32([1.0, 2.0])}, 5, node_id=1)])
