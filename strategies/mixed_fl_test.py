"""Mixed FL strategy on fixed tensors and mock replies: the combination of each algorithm,
hand-computed (a flipped sign, a swapped weight or a missing term changes the numbers)."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flowerbed.common.records import wire_nbytes
from flowerbed.common.testing import FakeGrid, mock_reply
from flowerbed.strategies.mixed_fl import (
    CLIENT_GRAD,
    SERVER_GRAD,
    MixedFL,
    MixedFLError,
    apply_delta,
    client_direction,
    parallel_delta,
    server_direction,
)

A = lambda *v: np.array(v, dtype=np.float32)  # noqa: E731
X0 = A(0.0, 0.0)
C = A(10.0, -10.0)  # optimum of the fake server loss f_c(z) = 0.5 ||z - C||^2


def test_parallel_delta_hand_computed():
    out = parallel_delta({"w": A(1, 2)}, {"w": A(10, -4)}, w_f=0.7, w_c=0.3)
    np.testing.assert_allclose(out["w"], [0.7 + 3.0, 1.4 - 1.2], rtol=1e-6)


def test_client_direction_hand_computed_numpy_and_torch():
    out = client_direction({"w": A(1, -2)}, {"w": A(4, 6)}, w_f=0.7, w_c=0.3)
    np.testing.assert_allclose(out["w"], [0.7 + 1.2, -1.4 + 1.8], rtol=1e-6)
    t = client_direction(
        {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([4.0, 6.0])}, 0.7, 0.3
    )
    np.testing.assert_allclose(t["w"].numpy(), [1.9, 0.4], rtol=1e-6)


def test_server_direction_hand_computed():
    # w_c on the server's own gradient, w_f on the clients' one (swapped: 2.8 + 0.3 = 3.1)
    out = server_direction({"w": A(4, 6)}, {"w": A(1, -2)}, w_f=0.7, w_c=0.3)
    np.testing.assert_allclose(out["w"], [1.2 + 0.7, 1.8 - 1.4], rtol=1e-6)


def test_apply_delta_and_key_mismatch():
    np.testing.assert_allclose(apply_delta({"w": A(1, 1)}, {"w": A(2, -1)}, 0.5)["w"], [2.0, 0.5])
    with pytest.raises(MixedFLError, match="keys differ"):
        parallel_delta({"w": A(1)}, {"v": A(1)}, 0.5, 0.5)


class FakeServer:
    """f_c(z) = 0.5 ||z - C||^2 (gradient z - C), ``k`` SGD steps of size ``lr``."""

    def __init__(self, k: int = 1, lr: float = 0.5, allow_steps: bool = True):
        self.k, self.lr, self.allow_steps = k, lr, allow_steps
        self.calls: list[str] = []

    def gradient(self, server_round, arrays):
        self.calls.append("gradient")
        return ArrayRecord({"w": Array(arrays["w"].numpy() - C)})

    def steps(self, server_round, arrays, direction):
        assert self.allow_steps, "1-way takes no server step"
        self.calls.append("steps")
        z = arrays["w"].numpy().copy()
        for _ in range(self.k):
            z = z - self.lr * np.asarray(direction({"w": z - C})["w"])
        return ArrayRecord({"w": Array(z.astype(np.float32))})


def _reply(model, n, node, grad=None):
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(A(*model))}),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    if grad is not None:
        content[CLIENT_GRAD] = ArrayRecord({"w": Array(A(*grad))})
    return mock_reply(content, node_id=node)


def _strategy(algorithm, server, **kw):
    s = MixedFL(
        server,
        algorithm=algorithm,
        w_f=0.7,
        w_c=0.3,
        min_available_nodes=1,
        min_train_nodes=1,
        fraction_evaluate=0.0,
        **kw,
    )
    msgs = list(
        s.configure_train(1, ArrayRecord({"w": Array(X0)}), ConfigRecord(), FakeGrid([1, 2]))
    )
    return s, msgs


# replies: models (1, 2) with n = 1 and (3, 6) with n = 3 -> weighted mean (2.5, 5) = Delta_f
REPLIES = [((1, 2), 1, (1, 1)), ((3, 6), 3, (5, -3))]


def test_parallel_round_hand_computed():
    s, msgs = _strategy("parallel", FakeServer(k=2))
    assert all(SERVER_GRAD not in m.content.array_records for m in msgs)  # FedAvg's payload
    assert msgs[0].content["config"]["mixed-algorithm"] == "parallel"
    new, _ = s.aggregate_train(1, [_reply(m, n, i + 1) for i, (m, n, _) in enumerate(REPLIES)])
    # server: z1 = 0 - 0.5 (0 - C) = (5, -5); z2 = z1 - 0.5 (z1 - C) = (7.5, -7.5)
    # Delta = 0.7 (2.5, 5) + 0.3 (7.5, -7.5) = (4.0, 1.25)
    np.testing.assert_allclose(new["w"].numpy(), [4.0, 1.25], rtol=1e-6)
    assert s.history[1]["server_delta_norm"] == pytest.approx(7.5 * 2**0.5)


def test_server_lr_scales_the_combined_delta():
    s, _ = _strategy("parallel", FakeServer(k=2), server_lr=0.5)
    new, _ = s.aggregate_train(1, [_reply(m, n, i + 1) for i, (m, n, _) in enumerate(REPLIES)])
    np.testing.assert_allclose(new["w"].numpy(), [2.0, 0.625], rtol=1e-6)


def test_one_way_sends_the_server_gradient_and_averages_only():
    server = FakeServer(allow_steps=False)
    s, msgs = _strategy("1-way", server)
    grads = [m.content[SERVER_GRAD]["w"].numpy() for m in msgs]
    assert all(np.array_equal(g, X0 - C) for g in grads)  # g_c at x^t, to every client
    cfg = msgs[0].content["config"]
    assert (cfg["w-f"], cfg["w-c"]) == (0.7, 0.3)
    # the extra download: one model-sized ArrayRecord more than the parallel message
    _, plain = _strategy("parallel", FakeServer())
    assert wire_nbytes(msgs[0].content) > wire_nbytes(plain[0].content) + 2 * 4
    new, _ = s.aggregate_train(1, [_reply(m, n, i + 1) for i, (m, n, _) in enumerate(REPLIES)])
    np.testing.assert_allclose(new["w"].numpy(), [2.5, 5.0], rtol=1e-6)
    assert server.calls == ["gradient"]


def test_two_way_round_hand_computed():
    s, msgs = _strategy("2-way", FakeServer(k=1))
    assert SERVER_GRAD in msgs[0].content.array_records
    replies = [_reply(m, n, i + 1, grad=g) for i, (m, n, g) in enumerate(REPLIES)]
    new, _ = s.aggregate_train(1, replies)
    # g_f = (1 (1, 1) + 3 (5, -3)) / 4 = (4, -2); the client gradients are not summed into Delta_f
    # server step at z = 0: 0.3 (0 - C) + 0.7 g_f = (-3 + 2.8, 3 - 1.4) = (-0.2, 1.6)
    # z = -0.5 (-0.2, 1.6) = (0.1, -0.8); Delta = 0.7 (2.5, 5) + 0.3 (0.1, -0.8) = (1.78, 3.26)
    np.testing.assert_allclose(new["w"].numpy(), [1.78, 3.26], rtol=1e-5)
    assert s.history[1]["client_grad_norm"] == pytest.approx(20**0.5)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (None, "without the ArrayRecord 'client-grad'"),
        ((np.nan, 0.0), "client-grad: array 'w' contains NaN"),
    ],
)
def test_two_way_malformed_reply_is_rejected_and_not_averaged(bad, reason):
    s, _ = _strategy("2-way", FakeServer(k=1))
    replies = [_reply(m, n, i + 1, grad=g) for i, (m, n, g) in enumerate(REPLIES)]
    replies.append(_reply((100, 100), 50, 3, grad=bad))  # huge weight: would dominate the mean
    new, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(new["w"].numpy(), [1.78, 3.26], rtol=1e-5)
    assert s.history[1]["num_rejected"] == 1
    assert reason in s.history[1]["failure_reasons"][0]


def test_bad_settings_are_named():
    with pytest.raises(MixedFLError, match="algorithm='3-way'"):
        MixedFL(FakeServer(), algorithm="3-way")
    with pytest.raises(MixedFLError, match="w_f=-1"):
        MixedFL(FakeServer(), w_f=-1)
    with pytest.raises(MixedFLError, match="not both 0"):
        MixedFL(FakeServer(), w_f=0, w_c=0)
