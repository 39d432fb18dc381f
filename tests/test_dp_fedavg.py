"""Central DP option of the FedAvg app: clipping, noise scale, RDP epsilon (hand-computed), and
epsilon per round in results.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from flowerbed.common.testing import FakeGrid, mock_reply, train_reply
from flowerbed.strategies.dpfedavg import DPFedAvg


def _dp(z=1.0, c=1.0, m=2, population=None, size=4):
    s = DPFedAvg(
        noise_multiplier=z, clipping_norm=c, num_sampled_clients=m, population_size=population
    )
    g = ArrayRecord({"w": Array(np.zeros(size, np.float32))})
    list(s.configure_train(1, g, ConfigRecord(), FakeGrid(list(range(1, m + 1)))))
    return s


def test_updates_are_clipped_and_divided_by_m():
    s = _dp(z=1e-7, c=1.0, m=2)
    replies = [
        train_reply({"w": np.full(4, 3.0, np.float32)}, 10, node_id=1),  # norm 6 -> clipped to 1
        train_reply({"w": np.full(4, 0.1, np.float32)}, 90, node_id=2),  # norm 0.2, kept
    ]
    np.random.seed(0)
    arrays, _ = s.aggregate_train(1, replies)
    # (0.5 + 0.1) / 2, unweighted: the 90-vs-10 example counts do not matter under DP
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, 0.3), atol=1e-5)


def test_noise_std_is_z_c_over_m():
    s = _dp(z=1.0, c=2.0, m=4, size=20000)
    replies = [train_reply({"w": np.zeros(20000, np.float32)}, 1, node_id=i) for i in (1, 2, 3, 4)]
    np.random.seed(1)
    arrays, _ = s.aggregate_train(1, replies)
    assert abs(arrays["w"].numpy().std() - 0.5) < 0.01  # 1.0 * 2.0 / 4


def test_a_dropped_or_rejected_reply_keeps_the_denominator_m_and_the_noise():
    """m = 3 sampled: one reply fails, one is rejected (NaN); the sum of the one clipped update
    is still divided by 3 and the noise std is still z C / 3, around a non-zero global model
    (the update is measured from it)."""
    m, size = 3, 30000
    s = DPFedAvg(noise_multiplier=1e-7, clipping_norm=1.0, num_sampled_clients=m)
    g = ArrayRecord({"w": Array(np.full(size, 2.0, np.float32))})
    list(s.configure_train(1, g, ConfigRecord(), FakeGrid([1, 2, 3])))
    # one good reply at distance 0.5 per entry from the global model: norm 0.5 sqrt(size) >> C
    good = train_reply({"w": np.full(size, 2.5, np.float32)}, 10, node_id=1)
    nan = np.full(size, 2.5, np.float32)
    nan[0] = np.nan
    replies = [good, mock_reply(node_id=2, error="client crashed"), train_reply({"w": nan}, 10, 3)]
    np.random.seed(0)
    arrays, _ = s.aggregate_train(1, replies)
    out = arrays["w"].numpy().astype(np.float64)
    # clipped update: 0.5 / (0.5 sqrt(size)) per entry, divided by m = 3 (not by the 1 reply)
    np.testing.assert_allclose(out, 2.0 + 1 / math.sqrt(size) / 3, rtol=0, atol=1e-6)
    assert s.history[1]["num_rejected"] == 1
    # the noise: std z C / m with m = 3 even though only one reply was averaged
    s = DPFedAvg(noise_multiplier=1.0, clipping_norm=1.5, num_sampled_clients=m)
    list(s.configure_train(1, g, ConfigRecord(), FakeGrid([1, 2, 3])))
    np.random.seed(1)
    arrays, _ = s.aggregate_train(1, [good, mock_reply(node_id=2, error="x")])
    noise = arrays["w"].numpy().astype(np.float64) - (2.0 + 1.5 / math.sqrt(size) / 3)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 0.5) < 0.01  # 1.0 * 1.5 / 3
    assert s.history[1]["dp_epsilon"] > 0  # the release was accounted


def _rdp_epsilon_q1(z: float, steps: int, delta: float) -> float:
    """Gaussian mechanism without subsampling: RDP(alpha) = steps * alpha / (2 z^2), converted
    with the bound Opacus uses (Balle et al. 2020), minimised over Opacus' default orders."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    return min(
        steps * a / (2 * z * z) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        for a in orders
    )


def test_epsilon_per_round_matches_hand_computed_rdp():
    s = _dp(z=1.5, m=2)
    eps = []
    for rnd in (1, 2, 3):
        g = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
        list(s.configure_train(rnd, g, ConfigRecord(), FakeGrid([1, 2])))
        s.aggregate_train(
            rnd, [train_reply({"w": np.ones(4, np.float32)}, 5, node_id=i) for i in (1, 2)]
        )
        eps.append(s.history[rnd]["dp_epsilon"])
    for t, e in enumerate(eps, 1):
        assert e == pytest.approx(_rdp_epsilon_q1(1.5, t, 1e-5), rel=1e-6)
    assert eps[0] < eps[1] < eps[2]
    # subsampling (q = 2/20) spends less
    q = _dp(z=1.5, m=2, population=20)
    q.aggregate_train(1, [train_reply({"w": np.ones(4, np.float32)}, 5, node_id=i) for i in (1, 2)])
    assert q.history[1]["dp_epsilon"] < eps[0]
    # accountant state survives a checkpoint round trip
    t = _dp(z=1.5, m=2)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.epsilon() == pytest.approx(eps[2])


def test_dp_run_reports_epsilon_per_round(tmp_path):
    from flowerbed.common.testing import TINY_FEDAVG, app_path
    from flowerbed.simulation.inprocess import run_app

    app_path("fedavg")
    out = tmp_path / "dp"
    cfg = {
        **TINY_FEDAVG,
        "num-server-rounds": 2,
        "dp-noise-multiplier": 0.8,
        "dp-clipping-norm": 0.5,
        "results-dir": str(out),
    }
    run_app("fedavg", cfg, num_supernodes=3, num_cpus=0.5)
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    e1, e2 = rounds[1]["dp_epsilon"], rounds[2]["dp_epsilon"]
    assert e1 == pytest.approx(_rdp_epsilon_q1(0.8, 1, 1e-5), rel=1e-6)
    assert e2 == pytest.approx(_rdp_epsilon_q1(0.8, 2, 1e-5), rel=1e-6)
    assert rec["extra"]["final"]["dp_epsilon"] == pytest.approx(e2)
    assert math.isfinite(rec["extra"]["final"]["accuracy"])
