"""PrivFusion method code against hand-computed values: the activation mechanism (clipping,
sensitivity, noise and its standard deviation), the budget and its composition, the DP-SGD
settings that reach Opacus' optimizer, the affinities, the matchers' switches, the weighted
fusion, the adapter, and the parties' three steps (ClientApp handlers on mock messages).

Each test names the single-line mutations of the method code it catches (README, Tests).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from flowerbed.common.testing import app_path, mock_reply

app_path("privfusion")

from privfusion import task  # noqa: E402
from privfusion.matching import (  # noqa: E402
    _affinity,
    _dist,
    average_layers,
    lawler_affinity,
    match,
    permute_layers,
    unary_affinities,
)
from privfusion.task import (  # noqa: E402
    MLP,
    AdaptedMLP,
    act_sigma,
    activation_stats,
    analytic_gaussian_sigma,
    budget,
    hidden_activations,
    parse_config,
    sgd_train,
)

BC = {"dataset": "breast_cancer", "hidden": "8,4", "batch-size": 32, "act-samples": 100}


def _ctx(pid: int, n: int, run_config: dict, state: RecordDict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=pid + 1,
        node_config={"partition-id": pid, "num-partitions": n},
        state=state if state is not None else RecordDict(),
        run_config=run_config,
    )


# ------------------------------------------------------------------ activation mechanism
def _data(n=400, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _model(d=6, classes=4, hidden=(40, 30), seed=0):
    torch.manual_seed(seed)
    return MLP(d, classes, hidden=hidden)


def test_activation_profiles_are_class_means_of_unit_normalised_vectors():
    """Without noise the released profile is, per class, the mean of each record's activation
    vector scaled to unit L2 norm (the clipping), divided by the class count (the denominator).
    Catches: no normalisation, a wrong norm axis, dividing by m instead of the class count."""
    x, y = _data()
    model = _model()
    acts, counts, info = activation_stats(model, x, y, 4, 250, math.inf, 1e-5, seed=3)
    assert info["act_sigma"] == 0.0 and info["act_samples"] == 250
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[:250]
    labels = y[idx].numpy()
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=4))
    for layer, hidden in zip(acts, hidden_activations(model, x[idx]), strict=True):
        h = hidden.double().numpy()
        for c in range(4):
            rows = h[labels == c]
            unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
            np.testing.assert_allclose(layer[:, c], unit.mean(0), rtol=1e-6, atol=1e-9)


def test_activation_release_sensitivity_is_sqrt_layers_plus_one():
    """Adding one record changes the released sums and counts by exactly sqrt(L + 1) in L2 (one
    unit vector per hidden layer, one count), the sensitivity the noise is calibrated to.
    Catches: sensitivity sqrt(L), L + 1, 1; the count left out of the sensitivity."""
    x, y = _data(n=60)
    model = _model()

    def released_sums(xs, ys):
        acts, counts, info = activation_stats(model, xs, ys, 4, len(xs), math.inf, 1e-5, 0)
        return np.concatenate([(a * counts[None, :]).ravel() for a in acts] + [counts]), info

    full, info = released_sums(x, y)
    less, _ = released_sums(x[:-1], y[:-1])  # neighbour: the last record removed
    # activation_stats takes a random subset of size m = n, i.e. all records, in some order
    assert np.linalg.norm(full - less) == pytest.approx(math.sqrt(3), rel=1e-6)
    assert info["act_sensitivity"] == pytest.approx(math.sqrt(3))  # 2 hidden layers + counts


def test_activation_noise_has_the_calibrated_standard_deviation():
    """The released sums and counts carry Gaussian noise of std sigma = the analytic Gaussian
    mechanism's at (eps_act, delta_act, sqrt(L + 1)). Catches: noise dropped from the sums or
    the counts, a wrong sensitivity or epsilon in the calibration, noise scaled by the count."""
    x, y = _data(n=2000, classes=10)
    model = _model(classes=10, hidden=(120, 80))
    eps, delta = 0.5, 1e-6
    clean, c0, _ = activation_stats(model, x, y, 10, 2000, math.inf, delta, seed=5)
    noisy, c1, info = activation_stats(model, x, y, 10, 2000, eps, delta, seed=5)
    sigma = analytic_gaussian_sigma(eps, delta, math.sqrt(3))
    assert info["act_sigma"] == pytest.approx(sigma, rel=1e-12)
    assert sigma > 5  # eps = 0.5 at delta = 1e-6: a large sigma (about 9.7)
    assert c0.min() > 10 * sigma  # no count floored at 1: the sums can be recovered
    noise = np.concatenate(
        [(n * c1[None, :] - a * c0[None, :]).ravel() for n, a in zip(noisy, clean, strict=True)]
    )
    assert noise.size == (120 + 80) * 10
    assert abs(noise.mean()) < 4 * sigma / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(sigma, rel=0.06)
    count_noise = c1 - c0
    assert np.all(count_noise != 0) and np.all(np.abs(count_noise) < 5 * sigma)


def test_act_sigma_of_the_matcher_is_the_released_one():
    """The sigma the receiving party assumes (class filter) is the sigma the sender used:
    the activation share eps * act-frac, delta * act-frac, sensitivity sqrt(L + 1)."""
    cfg = parse_config({"epsilon": 4.0, "act-frac": 0.2, "delta": 1e-5})
    expected = analytic_gaussian_sigma(0.8, 2e-6, math.sqrt(3))
    assert act_sigma(cfg, 2) == pytest.approx(expected, rel=1e-12)
    assert act_sigma(parse_config({"epsilon": 0.0}), 2) == 0.0


# ------------------------------------------------------------------ budget and composition
def test_budget_shares_hand_computed():
    """eps 10, act-frac 0.1, adapter-frac 0.2: fusing party 7 / 1 / 2; others 9 / 1 / 0;
    adapter-rank 0 switches the adapter share off (it goes back to DP-SGD)."""
    rc = {"epsilon": 10.0, "act-frac": 0.1, "adapter-frac": 0.2, "delta": 1e-5}
    cfg = parse_config(rc)
    f = budget(cfg, fusing=True)
    assert (f["sgd"], f["act"], f["adapter"]) == pytest.approx((7.0, 1.0, 2.0))
    assert (f["delta_sgd"], f["delta_act"], f["delta_adapter"]) == pytest.approx((7e-6, 1e-6, 2e-6))
    o = budget(cfg, fusing=False)
    assert (o["sgd"], o["act"], o["adapter"]) == pytest.approx((9.0, 1.0, 0.0))
    no_adapter = budget(parse_config({**rc, "adapter-rank": 0}), fusing=True)
    assert (no_adapter["sgd"], no_adapter["adapter"]) == pytest.approx((9.0, 0.0))


def test_dp_sgd_settings_reach_opacus_optimizer(monkeypatch):
    """target epsilon, delta, max grad norm and epochs reach make_private_with_epsilon, and the
    optimizer Opacus returns is the one that steps (its noise multiplier is reported)."""
    import opacus

    seen = {}

    class Spy(opacus.PrivacyEngine):
        def make_private_with_epsilon(self, **kw):
            seen.update(kw)
            model, opt, loader = super().make_private_with_epsilon(**kw)
            seen["optimizer"] = opt
            orig = opt.step

            def step(*a, **k):
                seen["steps"] = seen.get("steps", 0) + 1
                return orig(*a, **k)

            opt.step = step
            return model, opt, loader

    monkeypatch.setattr(opacus, "PrivacyEngine", Spy)
    x, y = _data(n=200, classes=2)
    model = MLP(6, 2, hidden=(5,))
    dp = {"target_epsilon": 3.0, "delta": 1e-6, "max_grad_norm": 0.37}
    info = sgd_train(model, list(model.parameters()), x, y, epochs=2, batch_size=20, lr=0.1, **dp)
    assert seen["target_epsilon"] == 3.0 and seen["target_delta"] == 1e-6
    assert seen["max_grad_norm"] == 0.37 and seen["epochs"] == 2
    opt = seen["optimizer"]
    assert opt.max_grad_norm == pytest.approx(0.37)
    assert opt.noise_multiplier == info["noise_multiplier"] > 0.5
    assert seen["steps"] == info["steps"] > 0


def test_party_and_adapter_training_get_their_budget_shares(monkeypatch):
    """train_party trains at the party's DP-SGD share (fusing party: minus the adapter's) and
    train_adapter at the adapter share, with the config's clipping norm, lr and epochs."""
    calls = []

    def fake(module, params, x, y, **kw):
        calls.append(kw)
        return {"epsilon": kw["target_epsilon"], "steps": 1, "noise_multiplier": 1.0}

    monkeypatch.setattr(task, "sgd_train", fake)
    cfg = parse_config(
        {**BC, "epsilon": 10.0, "act-frac": 0.1, "adapter-frac": 0.2, "max-grad-norm": 0.7}
        | {"adapter-lr": 0.05, "adapter-epochs": 3, "local-epochs": 4, "lr": 0.3}
    )
    task.train_party(cfg, 1, 3)
    task.train_party(cfg, 0, 3)
    fused = task.make_model(cfg, (30,), 2, 0)
    task.train_adapter(cfg, fused, 0, 3)
    other, fusing, adapter = calls
    assert other["target_epsilon"] == pytest.approx(9.0)
    assert other["delta"] == pytest.approx(9e-6)
    assert fusing["target_epsilon"] == pytest.approx(7.0)
    assert adapter["target_epsilon"] == pytest.approx(2.0)
    assert adapter["delta"] == pytest.approx(2e-6)
    assert all(c["max_grad_norm"] == 0.7 for c in calls)
    assert other["epochs"] == 4 and other["lr"] == 0.3
    assert adapter["epochs"] == 3 and adapter["lr"] == 0.05


def test_non_private_training_clips_the_batch_gradient():
    """Without DP every step's gradient is clipped to max_grad_norm: the parameters move at
    most steps * lr * C (plain SGD). Catches: the non-private clipping switched off."""
    x, y = _data(n=64, classes=2)
    model = MLP(6, 2, hidden=(5,))
    before = torch.cat([p.detach().clone().flatten() for p in model.parameters()])
    info = sgd_train(
        model,
        list(model.parameters()),
        x * 100,  # large inputs: unclipped gradients are large
        y,
        epochs=1,
        batch_size=16,
        lr=1.0,
        max_grad_norm=1e-3,
        seed=0,
    )
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert info["steps"] == 4 and math.isinf(info["epsilon"])
    assert 0 < float((after - before).norm()) <= 4 * 1.0 * 1e-3 * (1 + 1e-5)


# ------------------------------------------------------------------ affinities and matching
def test_distance_and_affinity_hand_computed():
    a = np.array([[0.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 0.0], [6.0, 8.0]])
    np.testing.assert_allclose(_dist(a, b), [[0, 10], [5, 5]], atol=1e-12)
    # exp(-d / mean d), mean = 5
    np.testing.assert_allclose(
        _affinity(np.array([[0.0, 10.0], [5.0, 5.0]])), np.exp(-np.array([[0, 2], [1, 1]]))
    )


def test_unary_affinity_features_and_activation_exponent():
    """Layer 0: [bias, incoming row]; last hidden layer: [bias, outgoing column]; the activation
    affinity enters as a factor raised to act-weight."""
    a = [
        (np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([0.0, 1.0])),
        (np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.5, 0.5])),
        (np.array([[1.0, -1.0]]), np.array([0.0])),
    ]
    b = [(np.array([[0.0, 1.0], [2.0, 0.0]]), np.array([1.0, 0.0])), *a[1:]]
    u = unary_affinities(a, b)
    feats0a = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
    feats0b = np.array([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    d0 = np.array([[math.sqrt(3), 1.0], [1.0, 3.0]])  # by hand
    np.testing.assert_allclose(_dist(feats0a, feats0b), d0, rtol=1e-12)
    np.testing.assert_allclose(u[0], np.exp(-d0 / d0.mean()), rtol=1e-12)
    feats1a = np.array([[0.5, 1.0], [0.5, -1.0]])  # bias, outgoing weight to the output
    np.testing.assert_allclose(u[1], _affinity(_dist(feats1a, feats1a)))
    acts_a = [np.array([[1.0], [0.0]]), np.array([[2.0], [0.0]])]
    acts_b = [np.array([[0.0], [1.0]]), np.array([[2.0], [0.0]])]
    ua = unary_affinities(a, b, acts_a, acts_b, act_weight=0.5)
    d = np.array([[1.0, 0.0], [0.0, 1.0]])  # mean 0.5
    np.testing.assert_allclose(ua[0], u[0] * np.exp(-d / 0.5) ** 0.5)
    np.testing.assert_allclose(unary_affinities(a, b, acts_a, acts_b, act_weight=0.0)[0], u[0])


def test_lawler_affinity_entries_hand_computed():
    """K[idx(a1, b1), idx(a2, b2)] = exp(-|W_A[a2, a1] - W_B[b2, b1]| / s), s = mean |diff|,
    symmetric; idx(a, b) = b * H + a; diagonal = the unary affinities; cross-layer pairs 0."""
    rng = np.random.default_rng(0)
    a = [
        (rng.normal(size=(2, 3)), rng.normal(size=2)),
        (rng.normal(size=(2, 2)), rng.normal(size=2)),
    ]
    a.append((rng.normal(size=(1, 2)), rng.normal(size=1)))
    b = [(rng.normal(size=w.shape), rng.normal(size=bias.shape)) for w, bias in a]
    unary = unary_affinities(a, b)
    assert not np.allclose(unary[0], unary[0].T)  # a transposed diagonal would show
    k = lawler_affinity(a, b, unary)
    h = 4
    assert k.shape == (16, 16)
    wa, wb = a[1][0], b[1][0]
    diffs = [
        abs(wa[a2, a1] - wb[b2, b1])
        for a2 in range(2)
        for a1 in range(2)
        for b2 in range(2)
        for b1 in range(2)
    ]
    s = float(np.mean(diffs))
    for a1, b1, a2, b2 in [(0, 0, 0, 0), (1, 0, 0, 1), (0, 1, 1, 1), (1, 1, 0, 0)]:
        i = b1 * h + a1
        j = (2 + b2) * h + (2 + a2)
        expected = math.exp(-abs(wa[a2, a1] - wb[b2, b1]) / s)
        assert k[i, j] == pytest.approx(expected, rel=1e-12)
        assert k[j, i] == pytest.approx(expected, rel=1e-12)
    for ai in range(2):
        for bi in range(2):
            assert k[bi * h + ai, bi * h + ai] == pytest.approx(unary[0][ai, bi])
            assert k[(2 + bi) * h + 2 + ai, (2 + bi) * h + 2 + ai] == pytest.approx(
                unary[1][ai, bi]
            )
    assert k[0 * h + 0, 0 * h + 2] == 0.0  # node pair across layers (a=0 of layer 0, b=... )
    assert k[1 * h + 0, 0 * h + 1] == 0.0  # two pairs of layer 0: no edge within a layer


def _second_layer_only_by_incoming_weights(seed=0):
    """A 4-3-3-1 MLP whose second hidden layer has equal biases and equal outgoing weights:
    only its incoming weights tell its neurons apart."""
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(3, 4)), rng.normal(size=3)),
        (rng.normal(size=(3, 3)), np.zeros(3)),
        (np.ones((1, 3)), np.zeros(1)),
    ]


def test_hungarian_uses_incoming_weights_of_deeper_layers():
    a = _second_layer_only_by_incoming_weights()
    true = [np.array([2, 0, 1]), np.array([1, 2, 0])]
    b = permute_layers(a, true)
    perms = match(a, b, method="hungarian", act_weight=0.0)
    for p, t in zip(perms, true, strict=True):
        np.testing.assert_array_equal(t[p], np.arange(len(p)))


def test_activation_affinity_switch_decides_between_twin_neurons():
    """Two neurons with identical weights are told apart only by their activation profiles:
    act-weight > 0 follows the profiles, act-weight = 0 cannot (identity)."""
    w0 = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    a = [(w0, np.zeros(3)), (np.ones((1, 3)), np.zeros(1))]
    acts_a = [np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])]
    acts_b = [acts_a[0][[1, 0, 2]]]  # B's neurons 0 and 1 are A's 1 and 0 by their profiles
    on = match(a, a, acts_a, acts_b, method="hungarian", act_weight=1.0)
    off = match(a, a, acts_a, acts_b, method="hungarian", act_weight=0.0)
    np.testing.assert_array_equal(on[0], [1, 0, 2])
    np.testing.assert_array_equal(off[0], [0, 1, 2])


@pytest.mark.parametrize("method", ["rrwm", "sm"])
def test_qap_matchers_recover_permutation_from_edges(method):
    """The QAP matchers recover a known permutation of the breast-cancer network size (16-8)
    with noisy unary affinities, using the pairwise edge terms."""
    rng = np.random.default_rng(3)
    a = [
        (rng.normal(size=(16, 30)), rng.normal(size=16)),
        (rng.normal(size=(8, 16)), rng.normal(size=8)),
        (rng.normal(size=(2, 8)), rng.normal(size=2)),
    ]
    true = [rng.permutation(16), rng.permutation(8)]
    b = permute_layers(a, true)
    perms = match(a, b, method=method, act_weight=0.0)
    for p, t in zip(perms, true, strict=True):
        np.testing.assert_array_equal(t[p], np.arange(len(p)))


def test_weighted_fusion_hand_computed():
    a = [(np.full((2, 2), 1.0), np.full(2, 2.0))]
    b = [(np.full((2, 2), 5.0), np.full(2, 6.0))]
    fused = average_layers([a, b], [1.0, 3.0])
    np.testing.assert_allclose(fused[0][0], 4.0)  # (1 + 3 * 5) / 4
    np.testing.assert_allclose(fused[0][1], 5.0)  # (2 + 3 * 6) / 4
    np.testing.assert_allclose(average_layers([a, b, b])[0][0], 11 / 3)


# ------------------------------------------------------------------ adapter
def test_adapter_starts_as_identity_and_trains_only_itself():
    """up = 0 at init: the adapted model equals the fused one; training moves the adapter only
    (the fused weights are frozen). Catches: no zero init, the residual dropped, base unfrozen."""
    torch.manual_seed(0)
    base = MLP(6, 2, hidden=(5, 4))
    frozen = [p.detach().clone() for p in base.parameters()]
    model = AdaptedMLP(base, rank=2)
    x, y = _data(n=64, classes=2)
    torch.testing.assert_close(model(x), base(x))
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4 and all(p.shape[0] == 2 or p.shape[1] == 2 for p in params)
    sgd_train(model, params, x, y, epochs=2, batch_size=16, lr=0.5, seed=0)
    for p, q in zip(base.parameters(), frozen, strict=True):
        torch.testing.assert_close(p, q)
    assert any(float(u.weight.abs().sum()) > 0 for u in model.up)
    assert not torch.allclose(model(x), base(x))


# ------------------------------------------------------------------ the parties' steps
def _local(pid, n, run_config, state=None):
    from privfusion.client_app import local

    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    ctx = _ctx(pid, n, run_config, state)
    return local(mock_reply(content), ctx).content, ctx


def test_local_step_reports_the_composed_epsilon_and_released_sigma():
    """A non-fusing party: eps_spent = Opacus' eps of DP-SGD (at most 0.9 eps) + eps_act
    (0.1 eps); the activation sigma is the analytic one at (0.1 eps, 0.1 delta, sqrt(3))."""
    rc = {**BC, "local-epochs": 1, "epsilon": 4.0, "delta": 1e-5}
    out, ctx = _local(1, 3, rc)
    m = out["metrics"]
    assert m["eps_act"] == pytest.approx(0.4)
    assert 0.8 * 3.6 < m["eps_sgd"] <= 3.6 + 1e-6
    assert m["eps_spent"] == pytest.approx(m["eps_sgd"] + m["eps_act"], rel=1e-12)
    assert m["delta_spent"] == pytest.approx(1e-5)
    assert m["act_sigma"] == pytest.approx(analytic_gaussian_sigma(0.4, 1e-6, math.sqrt(3)))
    assert m["noise_multiplier"] > 0.3
    assert sorted(out["acts"]) == ["act.0", "act.1", "counts"]
    assert out["acts"]["act.0"].numpy().shape == (8, 2)
    # the party keeps exactly what it released (the matching uses released statistics only)
    for k in out["weights"]:
        np.testing.assert_array_equal(ctx.state["model"][k].numpy(), out["weights"][k].numpy())


def test_align_step_recovers_a_known_permutation_of_the_reference():
    """The aligning party holds a permuted copy of the reference model and its profiles: its
    aligned release is the reference's weights exactly (matched in the right direction)."""
    from privfusion.client_app import _acts_record, align
    from privfusion.task import layers_record

    rng = np.random.default_rng(0)
    ref = [
        (rng.normal(size=(8, 30)), rng.normal(size=8)),
        (rng.normal(size=(4, 8)), rng.normal(size=4)),
        (rng.normal(size=(2, 4)), rng.normal(size=2)),
    ]
    acts = [rng.random((8, 2)), rng.random((4, 2))]
    counts = np.array([60.0, 90.0])
    true = [rng.permutation(8), rng.permutation(4)]
    own = permute_layers(ref, true)
    own_acts = [acts[0][true[0]], acts[1][true[1]]]
    state = RecordDict({"model": layers_record(own), "acts": _acts_record(own_acts, counts)})
    content = RecordDict({"weights": layers_record(ref), "acts": _acts_record(acts, counts)})
    for matcher in ("hungarian", "rrwm"):
        rc = {**BC, "epsilon": 4.0, "matcher": matcher}
        out = align(mock_reply(content), _ctx(1, 3, rc, state)).content
        for k in out["weights"]:
            np.testing.assert_allclose(
                out["weights"][k].numpy(), layers_record(ref)[k].numpy(), rtol=1e-6
            )
        moved = sum(int((t != np.arange(len(t))).sum()) for t in true)
        assert out["metrics"]["moved_neurons"] == moved > 0
        assert out["metrics"]["act_classes"] == 2


def test_fuse_step_averages_aligned_models_with_its_own():
    """The fusing party's fused model is the plain mean of the relayed aligned models and its
    own; with adapter-rank 0 there is no adapter and no adapter epsilon."""
    from privfusion.client_app import fuse
    from privfusion.task import layers_record

    def const(v):
        return [(np.full((8, 30), v), np.full(8, v)), (np.full((4, 8), v), np.full(4, v))] + [
            (np.full((2, 4), v), np.full(2, v))
        ]

    state = RecordDict({"model": layers_record(const(1.0))})
    content = RecordDict(
        {"aligned.1": layers_record(const(2.0)), "aligned.2": layers_record(const(6.0))}
    )
    rc = {**BC, "adapter-rank": 0, "epsilon": 4.0}
    out = fuse(mock_reply(content), _ctx(0, 3, rc, state)).content
    for k in out["fused"]:
        np.testing.assert_allclose(out["fused"][k].numpy(), 3.0)  # (1 + 2 + 6) / 3
    assert out["metrics"]["fused_models"] == 3 and out["metrics"]["eps_adapter"] == 0.0
    assert "adapted" not in out.array_records
    rc = {**BC, "adapter-rank": 2, "epsilon": 4.0, "adapter-frac": 0.2}
    out = fuse(mock_reply(content), _ctx(0, 3, rc, state)).content
    assert "adapted" in out.array_records
    assert 0.8 * 0.8 < out["metrics"]["eps_adapter"] <= 0.8 + 1e-6  # the adapter's 20 % of 4
    assert isinstance(out["metrics"], MetricRecord)


def test_align_step_passes_the_run_config_to_the_matcher(monkeypatch):
    """matcher, act-weight and the class filter's sigma (the sender's: L = 2 hidden layers)
    reach the matching; a class with few noisy records is left out of the profiles."""
    import privfusion.client_app as client
    from privfusion.client_app import _acts_record, align
    from privfusion.task import layers_record

    seen = {}
    real_match, real_filter = client.match, client.reliable_classes

    def spy_match(a, b, acts_a, acts_b, **kw):
        seen.update(kw, acts=acts_a)
        return real_match(a, b, acts_a, acts_b, **kw)

    def spy_filter(ca, cb, sigma):
        seen["sigma"] = sigma
        return real_filter(ca, cb, sigma)

    monkeypatch.setattr(client, "match", spy_match)
    monkeypatch.setattr(client, "reliable_classes", spy_filter)
    rng = np.random.default_rng(1)
    ref = [
        (rng.normal(size=(8, 30)), rng.normal(size=8)),
        (rng.normal(size=(4, 8)), rng.normal(size=4)),
        (rng.normal(size=(2, 4)), rng.normal(size=2)),
    ]
    acts = _acts_record([rng.random((8, 2)), rng.random((4, 2))], np.array([80.0, 3.0]))
    state = RecordDict({"model": layers_record(ref), "acts": acts})
    content = RecordDict({"weights": layers_record(ref), "acts": acts})
    rc = {**BC, "epsilon": 4.0, "matcher": "sm", "act-weight": 0.7}
    out = align(mock_reply(content), _ctx(1, 3, rc, state)).content
    assert seen["method"] == "sm" and seen["act_weight"] == 0.7
    assert seen["sigma"] == pytest.approx(act_sigma(parse_config(rc), 2), rel=1e-12)
    assert seen["sigma"] > 3  # eps_act = 0.4: the class with 3 noisy records is left out
    assert [a.shape for a in seen["acts"]] == [(8, 1), (4, 1)]
    assert out["metrics"]["act_classes"] == 1 and out["metrics"]["moved_neurons"] == 0
