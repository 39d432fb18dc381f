"""FedAvg with Flower's SecAgg+ (``secagg = true``): exact up to quantisation, masked uploads.

One in-process run (3 clients, 1 round, digits/MLP) is observed through ``fedavg.secagg.TAP``,
which sees every message the ServerApp sends and receives and the global model it evaluates.

Bound (``fedavg/secagg.py``): with k clients, clipping range c, quantization range Q, max weight
W and client weights w_i = round(n_i Q / W) / Q, the SecAgg+ aggregate differs from the exact
example-weighted mean sum n_i p_i / sum n_i, per coordinate, by at most

    k * 1.5 * (2c / Q) / sum w_i              (stochastic rounding, < 1 step per client, plus
                                               < 0.25 step: secaggplus_mod quantizes float32
                                               arrays, (x + c) and (x + c) Q / 2c round)
  + k / (2Q) * max_i |p_i - mean| / sum w_i   (weights rounded to 1/Q)
  + |mean| * 2**-23                           (the aggregate is stored as float32)
"""

import json

import numpy as np
import pytest

from flowerbed.common.config import ConfigError
from flowerbed.common.testing import TINY_FEDAVG, app_path

app_path("fedavg")
from fedavg import secagg, task  # noqa: E402

K = 3
CFG = {**TINY_FEDAVG, "num-server-rounds": 1, "lr": 0.1}


def _client_updates(cfg):
    """Each client's locally trained arrays in round 1 (what its ClientApp computes)."""
    init = task.initial_arrays(cfg)
    out = []
    for pid in range(K):
        arrays, metrics = task.local_train(cfg, init, pid, K, 1)
        out.append(([a.numpy().astype(np.float64) for a in arrays.values()], metrics))
    return init, out


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    from flowerbed.simulation.inprocess import run_app

    out = tmp_path_factory.mktemp("secagg") / "run"
    seen = {"exchanges": [], "global": {}}

    def tap(stage, payload):
        if stage == "exchange":
            seen["exchanges"].append(payload)
        else:
            rnd, arrays = payload
            seen["global"][rnd] = [a.numpy().copy() for a in arrays.values()]

    secagg.TAP = tap
    try:
        run_app("fedavg", {**CFG, "secagg": True, "results-dir": str(out)}, num_supernodes=K)
    finally:
        secagg.TAP = None
    seen["results"] = json.loads((out / "results.json").read_text())
    return seen


def test_secagg_aggregate_equals_weighted_mean_within_quantisation(secagg_run):
    cfg = task.parse_config({**CFG, "secagg": True})
    init, updates = _client_updates(cfg)
    n = np.array([m["num-examples"] for _, m in updates], dtype=np.float64)
    rec = secagg_run["results"]
    row = {r["round"]: r for r in rec["rounds"]}[1]
    W = row["secagg_max_weight"]
    assert W == max(n)  # auto max weight: the largest partition
    c, Q = cfg["secagg-clipping-range"], cfg["secagg-quantization-range"]
    w = np.round(n * Q / W) / Q
    got = secagg_run["global"][1]
    worst, bound_worst = 0.0, 0.0
    for j, g in enumerate(got):
        ps = np.stack([u[j] for u, _ in updates])
        assert np.abs(ps).max() <= c  # nothing clipped: the bound applies
        mean = np.tensordot(n / n.sum(), ps, axes=1)
        bound = (
            K * 1.5 * (2 * c / Q) / w.sum()
            + K / (2 * Q) * np.abs(ps - mean).max(axis=0) / w.sum()
            + np.abs(mean) * 2.0**-23
        )
        err = np.abs(g.astype(np.float64) - mean)
        assert np.all(err <= bound), (j, float(err.max()), float(bound.max()))
        worst, bound_worst = max(worst, float(err.max())), max(bound_worst, float(bound.max()))
        assert g.dtype == init[list(init.keys())[j]].numpy().dtype
    print(f"SecAgg+ vs exact weighted mean: max |err| {worst:.3g} <= bound {bound_worst:.3g}")
    assert worst > 0  # the quantisation is real (and the test could fail)
    # the aggregate moved the model: it is the clients' mean, not the initial model
    assert not np.allclose(got[0], init[list(init.keys())[0]].numpy())
    assert row["num_train_replies"] == K and row["num_failures"] == 0
    assert row["bytes_sent"] > 0 and row["bytes_received"] > 0
    assert [r["round"] for r in rec["rounds"]] == [0, 1]
    assert rec["extra"]["final"]["accuracy"] == row["server_accuracy"]


def test_server_never_holds_an_unmasked_client_update(secagg_run):
    cfg = task.parse_config({**CFG, "secagg": True})
    _, updates = _client_updates(cfg)
    n = np.array([m["num-examples"] for _, m in updates], dtype=np.float64)
    c, Q = cfg["secagg-clipping-range"], cfg["secagg-quantization-range"]
    W = max(n)
    # what each client's quantized update would look like unmasked (up to rounding)
    plain_q = [
        np.concatenate([((n[i] / W) * u + c).ravel() * Q / (2 * c) for u in upd])
        for i, (upd, _) in enumerate(updates)
    ]
    floats = [np.concatenate([u.ravel() for u in upd]) for upd, _ in updates]
    masked = []
    for _sent, replies in secagg_run["exchanges"]:
        for r in replies:
            assert not r.has_error()
            # no reply of any stage carries model arrays (the mod clears them)
            for arr_rec in r.content.array_records.values():
                assert all(len(a.data) == 0 for a in arr_rec.values()) or len(arr_rec) == 0
            conf = r.content.config_records.get("secaggplus_configs", {})
            if "masked_params" in conf:
                from flwr.common import bytes_to_ndarray

                vec = [bytes_to_ndarray(b) for b in conf["masked_params"]]
                masked.append(np.concatenate([v.ravel() for v in vec[1:]]).astype(np.float64))
    assert len(masked) == K
    for m in masked:
        assert m.max() > 2**31  # masks are uniform over [0, 2**32): the values are too
        for q, f in zip(plain_q, floats, strict=True):
            assert m.shape == q.shape
            assert np.mean(np.abs(m - q) <= 1.0) < 1e-3  # not the client's quantized update
            assert not np.allclose(m, f)
    # the only unmasked vector is the aggregate: it is close to the clients' weighted mean
    # (previous test), while each masked upload is far from every client's update


def test_secagg_config_clashes_are_named():
    with pytest.raises(ConfigError, match="dp-noise-multiplier=0.5"):
        task.parse_config({"secagg": True, "dp-noise-multiplier": 0.5})
    with pytest.raises(ConfigError, match="checkpoint"):
        task.parse_config({"secagg": True, "checkpoint": True})
    with pytest.raises(ConfigError, match="secagg-num-shares=2.0"):
        task.parse_config({"secagg-num-shares": 2.0})


def test_secagg_survives_a_dropped_client(tmp_path):
    """A client that fails in the masked-upload stage: SecAgg+ reconstructs its pairwise masks
    from its neighbours' shares and unmasks the sum of the 4 others (launcher=local, no Ray)."""
    from flowerbed.simulation.local import run_local

    out = tmp_path / "drop"
    faults = {"fault-mode": "raise", "fault-partitions": "1"}
    cfg = {**CFG, "num-server-rounds": 2, "secagg": True, **faults, "results-dir": str(out)}
    run_local("fedavg", cfg, num_supernodes=5)
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    for r in (1, 2):
        assert rounds[r]["num_sampled"] == 5 and rounds[r]["num_train_replies"] == 4, rounds[r]
        assert rounds[r]["num_failures"] == 1, rounds[r]
    assert rounds[2]["server_accuracy"] > rounds[0]["server_accuracy"] + 0.1


@pytest.mark.e2e
def test_secagg_through_flwr_run(tmp_path):
    """The same option through the real ``flwr run`` (SuperLink, simulation runtime)."""
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    cfg = {**CFG, "num-server-rounds": 2, "secagg": True, "results-dir": str(out)}
    p = flwr_run("fedavg", cfg, num_supernodes=K, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fedavg fedavg (SecAgg+): final accuracy" in p.stdout
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert all(rounds[r]["num_train_replies"] == K for r in (1, 2))
    assert rec["extra"]["final"]["accuracy"] > rounds[0]["server_accuracy"]
