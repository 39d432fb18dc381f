"""PrivFusion unit tests: accounting, DP calibration, exact permutation recovery, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from flowerbed.common.testing import app_path

app_path("privfusion")

from privfusion.matching import average_layers, match, permute_layers  # noqa: E402
from privfusion.task import (  # noqa: E402
    MLP,
    RDP_ALPHAS,
    analytic_gaussian_sigma,
    budget,
    layers_of,
    parse_config,
    reliable_classes,
    sgd_train,
)

from flowerbed.common.config import ConfigError  # noqa: E402


def _random_layers(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(sizes[i + 1], sizes[i])), rng.normal(size=sizes[i + 1]))
        for i in range(len(sizes) - 1)
    ]


@pytest.mark.parametrize("method", ["hungarian", "rrwm", "sm"])
def test_matching_recovers_known_permutation_exactly(method):
    a = _random_layers([30, 16, 8, 2])
    rng = np.random.default_rng(1)
    true = [rng.permutation(16), rng.permutation(8)]
    b = permute_layers(a, true)  # neuron j of B is neuron true[j] of A
    acts_a = [rng.normal(size=(16, 2)), rng.normal(size=(8, 2))]
    acts_b = [acts_a[0][true[0]], acts_a[1][true[1]]]
    perms = match(a, b, acts_a, acts_b, method=method)
    for p, t in zip(perms, true, strict=True):
        np.testing.assert_array_equal(t[p], np.arange(len(p)))
    aligned = permute_layers(b, perms)
    for (wa, ba), (wc, bc) in zip(a, aligned, strict=True):
        np.testing.assert_array_equal(wa, wc)
        np.testing.assert_array_equal(ba, bc)
    # the permuted (unaligned) model is a different function parametrisation: averaging it
    # unaligned differs from the original, averaging it aligned gives the original back
    assert not np.allclose(average_layers([a, b])[0][0], a[0][0])
    np.testing.assert_allclose(average_layers([a, aligned])[0][0], a[0][0], rtol=1e-6)


def test_permutation_preserves_function():
    torch.manual_seed(0)
    model = MLP(12, 3, hidden=(8, 5))
    layers = layers_of(model)
    perm = [np.random.default_rng(2).permutation(8), np.random.default_rng(3).permutation(5)]
    permuted = permute_layers(layers, perm)
    x = np.random.default_rng(4).normal(size=(7, 12))

    def fwd(ls):
        h = x
        for w, b in ls[:-1]:
            h = np.maximum(h @ w.T + b, 0)
        return h @ ls[-1][0].T + ls[-1][1]

    np.testing.assert_allclose(fwd(layers), fwd(permuted), rtol=1e-10)


def test_reported_epsilon_matches_independent_opacus_accountant():
    from opacus.accountants import RDPAccountant

    torch.manual_seed(0)
    x = torch.randn(400, 10)
    y = (x[:, 0] > 0).long()
    model = MLP(10, 2, hidden=(6,))
    info = sgd_train(
        model,
        list(model.parameters()),
        x,
        y,
        epochs=3,
        batch_size=40,
        lr=0.1,
        target_epsilon=2.0,
        delta=1e-5,
        max_grad_norm=1.0,
        seed=7,
    )
    # recompute from the fixed configuration only: q = 40/400, 3 epochs of 10 steps
    acc = RDPAccountant()
    acc.history = [(info["noise_multiplier"], 40 / 400, 30)]
    independent = acc.get_epsilon(1e-5, alphas=RDP_ALPHAS)
    assert info["sample_rate"] == pytest.approx(0.1)
    assert info["accountant_steps"] == 30
    assert info["epsilon"] == pytest.approx(independent, rel=1e-9)
    assert 1.8 < info["epsilon"] <= 2.0 + 1e-6  # spent close to, never above, the target
    assert info["noise_multiplier"] > 0.5


def test_analytic_gaussian_sigma_meets_delta_exactly():
    for eps, delta, sens in [(1.0, 1e-5, 1.0), (0.2, 1e-6, 2.0), (8.0, 1e-5, 0.5)]:
        s = analytic_gaussian_sigma(eps, delta, sens)
        a, b = sens / (2 * s), eps * s / sens
        achieved = norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b)
        assert achieved <= delta * (1 + 1e-6)
        assert achieved >= 0.99 * delta  # tight: not a needlessly large sigma
    # classical bound sigma = sens * sqrt(2 ln(1.25/delta)) / eps is looser for eps < 1
    assert analytic_gaussian_sigma(0.5, 1e-5, 1.0) < math.sqrt(2 * math.log(1.25e5)) / 0.5
    assert analytic_gaussian_sigma(math.inf, 1e-5, 1.0) == 0.0


def test_budget_split_sums_to_epsilon():
    cfg = parse_config({"epsilon": 4.0, "act-frac": 0.1, "adapter-frac": 0.2})
    b = budget(cfg, fusing=True)
    assert b["sgd"] + b["act"] + b["adapter"] == pytest.approx(4.0)
    assert b["delta_sgd"] + b["delta_act"] + b["delta_adapter"] == pytest.approx(1e-5)
    other = budget(cfg, fusing=False)
    assert other["adapter"] == 0 and other["sgd"] + other["act"] == pytest.approx(4.0)
    assert math.isinf(budget(parse_config({"epsilon": 0.0}), True)["sgd"])


@pytest.mark.parametrize(
    ("override", "word"),
    [
        ({"method": "fedprox"}, "method"),
        ({"dataset": "cifar10"}, "cifar10"),
        ({"matcher": "ipfp"}, "matcher"),
        ({"hidden": "32,x"}, "hidden"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"act-frac": 0.6, "adapter-frac": 0.5}, "act-frac"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_bad_config_fails_with_clear_message(override, word):
    with pytest.raises(ValueError, match=word):
        parse_config(override)
    assert issubclass(ConfigError, ValueError)


def test_fusing_party_out_of_range_fails_in_parse_config():
    assert parse_config({"fusing-party": 2}, num_parties=3)["fusing-party"] == 2
    with pytest.raises(ConfigError, match="fusing-party = 3.*parties \\(3\\)"):
        parse_config({"fusing-party": 3}, num_parties=3)


def test_fusing_party_checked_by_server_before_any_message():
    from flwr.app import Context, RecordDict
    from privfusion.client_app import app as client_app
    from privfusion.server_app import main

    from flowerbed.simulation.local import LocalGrid

    class CountingGrid(LocalGrid):
        sent = 0

        def send_and_receive(self, messages, *, timeout=None):
            self.sent += len(list(messages))
            return []

    cfg = {"dataset": "breast_cancer", "fusing-party": 5, "results-dir": ""}
    grid = CountingGrid(client_app, cfg, 3)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    with pytest.raises(ConfigError, match="fusing-party = 5"):
        main(grid, ctx)
    assert grid.sent == 0  # no party trained anything


def test_refinement_keeps_exact_recovery_and_is_a_fixed_point():
    a = _random_layers([20, 12, 6, 3], seed=5)
    rng = np.random.default_rng(6)
    true = [rng.permutation(12), rng.permutation(6)]
    b = permute_layers(a, true)
    perms = match(a, b, method="hungarian", refine_iters=5)
    for p, t in zip(perms, true, strict=True):
        np.testing.assert_array_equal(t[p], np.arange(len(p)))
    # started from a wrong assignment of layer 2, weight matching finds the right one
    from privfusion.matching import refine

    start = [perms[0], np.roll(perms[1], 1)]
    fixed = refine(a, b, start, iters=10)
    for p, t in zip(fixed, true, strict=True):
        np.testing.assert_array_equal(t[p], np.arange(len(p)))


def test_reliable_classes_drops_classes_with_few_noisy_records():
    a = np.array([67.0, 0.4, 30.0, 12.0])
    b = np.array([80.0, 90.0, 2.0, 12.0])
    # sigma = 0: threshold is the floor of 5 records
    np.testing.assert_array_equal(reliable_classes(a, b, 0.0), [True, False, False, True])
    # sigma = 5: threshold 15 records
    np.testing.assert_array_equal(reliable_classes(a, b, 5.0), [True, False, False, False])


def test_pyproject_agrees_with_schema():
    from privfusion.task import SCHEMA

    from flowerbed.common.config import check_pyproject

    assert check_pyproject(app_path("privfusion"), SCHEMA) == []


def test_method_table_resolves_rows_and_flags():
    from privfusion.methods import METHODS

    from flowerbed.strategies.baselines import make_fedavg
    from flowerbed.strategies.privfusion import PrivFusion

    assert METHODS.names == ("privfusion", "fedavg")
    cfg = parse_config({"dataset": "breast_cancer"})
    assert cfg.method.flag("one-shot") is True and cfg.method.kind == "reconstruction"
    strategy = cfg.method.strategy(cfg)
    assert isinstance(strategy, PrivFusion) and strategy.fusing_party == 0
    fedavg = parse_config({"method": "fedavg", "num-server-rounds": 3})
    assert fedavg.method.flag("one-shot") is False and fedavg.method.strategy is make_fedavg
    assert fedavg.method.client is not None and fedavg["num-server-rounds"] == 3
    with pytest.raises(ConfigError, match="unknown run config key 'fedavg-rounds'"):
        parse_config({"fedavg-rounds": 3})  # renamed to num-server-rounds


def test_fedavg_client_step_is_the_shared_sgd_step():
    """The baseline's plain train message runs cfg.method.client: same (seed, party, round)
    gives the same update, and the update is trained at fedavg-lr."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from privfusion.client_app import train
    from privfusion.task import initial_arrays

    from flowerbed.common.testing import mock_reply

    run_config = {"method": "fedavg", "dataset": "breast_cancer", "hidden": "8"}
    cfg = parse_config(run_config)
    init = initial_arrays(cfg, one_shot=False)
    content = RecordDict({"arrays": init, "config": ConfigRecord({"server-round": 1})})

    def call(rc):
        ctx = Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 0, "num-partitions": 2},
            state=RecordDict(),
            run_config=rc,
        )
        return train(mock_reply(content), ctx).content

    out = call(run_config)
    assert out["metrics"]["num-examples"] > 100
    again = call(run_config)
    slow = call({**run_config, "fedavg-lr": 0.02})
    for k in init:
        np.testing.assert_array_equal(out["arrays"][k].numpy(), again["arrays"][k].numpy())
    moved = sum(float(np.abs(out["arrays"][k].numpy() - init[k].numpy()).sum()) for k in init)
    moved_slow = sum(float(np.abs(slow["arrays"][k].numpy() - init[k].numpy()).sum()) for k in init)
    assert moved > 2 * moved_slow > 0  # fedavg-lr is the step size (not lr)
