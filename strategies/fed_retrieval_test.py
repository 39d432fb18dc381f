"""Server Adam (Flower's FedAdam over flowerbed's FedAvg) on mock replies: the step by hand,
rejections with their reasons, the model kept when no reply is valid."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from flowerbed.common.testing import FakeGrid, train_reply
from flowerbed.strategies.fed_retrieval import ServerAdam, ServerAdamError, make_server_adam

W0 = np.zeros((2,), np.float32)


def _f(values) -> np.ndarray:
    return np.asarray(values, np.float32)


def _configured(**kw) -> ServerAdam:
    s = ServerAdam(min_available_nodes=1, min_train_nodes=1, **kw)
    list(s.configure_train(1, ArrayRecord({"w": Array(W0)}), ConfigRecord(), FakeGrid([1, 2, 3])))
    return s


def _adam_by_hand(delta, rnd=1, eta=1.0, b1=0.9, b2=0.999, tau=1e-3):
    """One Adam step from zero moments (Flower's bias correction uses round + 1)."""
    m = [(1 - b1) * d for d in delta]
    v = [(1 - b2) * d * d for d in delta]
    eta_n = eta * math.sqrt(1 - b2 ** (rnd + 1)) / (1 - b1 ** (rnd + 1))
    return [eta_n * mi / (math.sqrt(vi) + tau) for mi, vi in zip(m, v, strict=True)]


def test_server_adam_step_by_hand_on_the_example_weighted_mean():
    s = _configured()
    replies = [
        train_reply({"w": _f([1.0, 1.0])}, 1, node_id=1),
        train_reply({"w": _f([3.0, -1.0])}, 3, 2),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    # weighted mean (1*[1, 1] + 3*[3, -1]) / 4 = [2.5, -0.5]: the delta from W0 = 0
    np.testing.assert_allclose(arrays["w"].numpy(), _adam_by_hand([2.5, -0.5]), rtol=1e-5)
    # the server step moves with the delta's sign, about eta-sized (lr 1.0), not by the delta
    assert arrays["w"].numpy()[0] > 0 > arrays["w"].numpy()[1]
    # the model keeps its dtype (Flower's FedAdam computes in float64), so round 2's float32
    # replies pass the dtype check and move the model again
    assert arrays["w"].numpy().dtype == np.float32
    list(s.configure_train(2, arrays, ConfigRecord(), FakeGrid([1, 2, 3])))
    again, _ = s.aggregate_train(2, [train_reply({"w": _f([5.0, 5.0])}, 1, node_id=1)])
    assert s.history[2]["num_train_replies"] == 1
    assert not np.allclose(again["w"].numpy(), arrays["w"].numpy())


def test_a_malformed_reply_is_rejected_by_name_and_never_enters():
    s = _configured()
    good = [
        train_reply({"w": _f([1.0, 1.0])}, 1, node_id=1),
        train_reply({"w": _f([3.0, -1.0])}, 3, 2),
    ]
    bad_nan = train_reply({"w": _f([np.nan, 0.0])}, 5, node_id=3)
    arrays, _ = s.aggregate_train(1, [*good, bad_nan])
    np.testing.assert_allclose(arrays["w"].numpy(), _adam_by_hand([2.5, -0.5]), rtol=1e-5)
    h = s.history[1]
    assert h["num_rejected"] == 1 and h["num_train_replies"] == 2
    assert any("node 3: rejected" in r and "NaN" in r for r in h["failure_reasons"])
    s = _configured()
    wrong_shape = train_reply({"w": _f([1.0, 2.0, 3.0])}, 2, node_id=3)
    zero_weight = train_reply({"w": _f([1.0, 2.0])}, 0, node_id=2)
    assert s.aggregate_train(1, [wrong_shape, zero_weight]) == (None, None)  # model kept
    reasons = " ".join(s.history[1]["failure_reasons"])
    assert "shape" in reasons and "'num-examples'=0" in reasons


def test_settings_from_the_run_config_and_bad_ones_named():
    cfg = {
        "server-lr": 0.5,
        "server-beta1": 0.8,
        "server-beta2": 0.99,
        "server-tau": 1e-2,
        "fraction-train": 0.5,
        "seed": 7,
    }
    s = make_server_adam(cfg)
    assert (s.eta, s.beta_1, s.beta_2, s.tau) == (0.5, 0.8, 0.99, 1e-2)
    assert s.fraction_train == 0.5 and s.sample_seed == 7  # clients per round, seeded
    with pytest.raises(ServerAdamError, match="eta > 0"):
        ServerAdam(eta=0.0)
    with pytest.raises(ServerAdamError, match="beta"):
        ServerAdam(beta_2=1.0)
