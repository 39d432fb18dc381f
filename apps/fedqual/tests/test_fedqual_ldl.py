"""fedqual/ldl.py: the six LDL measures against hand-computed values, losses, corruption model."""

import numpy as np
import pytest
import torch

from flowerbed.common.testing import app_path

app_path("fedqual")
from fedqual.ldl import (  # noqa: E402
    _noise,
    _random_mix,
    _sharpen,
    _votes,
    calibrated_target,
    client_levels,
    corrupt,
    kl_loss,
    ldl_metrics,
    num_annotators,
    quality_score,
)

D1, P1 = [0.5, 0.3, 0.2], [0.4, 0.4, 0.2]
D2, P2 = [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]


def test_six_measures_hand_computed_one_sample():
    m = ldl_metrics([D1], [P1])
    assert m["chebyshev"] == pytest.approx(0.1)  # max(|.1|, |.1|, 0)
    # sqrt((.1/.9)^2 + (.1/.7)^2) = sqrt(0.0123457 + 0.0204082)
    assert m["clark"] == pytest.approx(0.1809802, abs=1e-6)
    assert m["canberra"] == pytest.approx(0.1 / 0.9 + 0.1 / 0.7)  # 0.2539683
    # .5 ln(.5/.4) + .3 ln(.3/.4) = 0.1115718 - 0.0863046
    assert m["kl"] == pytest.approx(0.0252672, abs=1e-6)
    # (.2 + .12 + .04) / (sqrt(.38) * sqrt(.36)) = .36 / .3698648
    assert m["cosine"] == pytest.approx(0.9733285, abs=1e-6)
    assert m["intersection"] == pytest.approx(0.9)  # .4 + .3 + .2


def test_six_measures_zero_terms_and_mean_over_samples():
    m2 = ldl_metrics([D2], [P2])
    assert m2["chebyshev"] == pytest.approx(0.5)
    assert m2["clark"] == pytest.approx(np.sqrt((0.5 / 1.5) ** 2 + 1.0))  # 0/0 term counts 0
    assert m2["canberra"] == pytest.approx(0.5 / 1.5 + 1.0)
    assert m2["kl"] == pytest.approx(np.log(2.0))  # zero-d terms count 0
    assert m2["cosine"] == pytest.approx(0.5 / np.sqrt(0.5))
    assert m2["intersection"] == pytest.approx(0.5)
    both = ldl_metrics([D1, D2], [P1, P2])
    m1 = ldl_metrics([D1], [P1])
    for k in both:
        assert both[k] == pytest.approx((m1[k] + m2[k]) / 2)
    perfect = ldl_metrics([D1], [D1])
    assert (
        perfect["kl"] == 0 and perfect["chebyshev"] == 0 and perfect["cosine"] == pytest.approx(1)
    )
    with pytest.raises(ValueError, match="shapes differ"):
        ldl_metrics([D1], [[0.5, 0.5]])


def test_kl_loss_and_calibrated_target():
    # uniform prediction, target (.5, .5, 0): KL = 2 * .5 ln(.5 * 3) = ln 1.5
    loss = kl_loss(torch.zeros(1, 3), torch.tensor([[0.5, 0.5, 0.0]]))
    assert float(loss) == pytest.approx(np.log(1.5), abs=1e-6)
    # calibrated target (1 - .4) (1, 0) + .4 (.5, .5) = (.8, .2); zero loss at that prediction
    t = calibrated_target(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), 0.4)
    torch.testing.assert_close(t, torch.tensor([[0.8, 0.2]]))
    logits = torch.log(torch.tensor([[0.8, 0.2]]))
    assert float(kl_loss(logits, t)) == pytest.approx(0.0, abs=1e-6)
    # alpha = 0 keeps the raw annotation: KL((1, 0) || (.8, .2)) = -ln .8
    t0 = calibrated_target(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), 0.0)
    assert float(kl_loss(logits, t0)) == pytest.approx(-np.log(0.8), abs=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        calibrated_target(t, t, 1.5)


def test_quality_score_hand_computed():
    # row 1: d - 1/3 = (80, -10, -70)/300, p - 1/3 = (50, -10, -40)/300:
    # corr = 6900 / sqrt(11400 * 4200) = 0.9971765; row 2 is anti-correlated: -1, clipped to 0
    d = np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    p = np.array([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]])
    assert quality_score(d, p, "corr") == pytest.approx(0.9971765 / 2, abs=1e-6)
    # a flat annotation and a sharp anchor, p - 1/3 = 4 (d - 1/3): correlation 1
    assert quality_score([[0.4, 0.35, 0.25]], [[0.6, 0.4, 0.0]], "corr") == pytest.approx(1.0)
    # kl: exp(-KL(d || p)) with d the annotation: .6 ln(.6/.5) + .1 ln(.1/.2) = 0.0400781
    # (the other direction, KL(p || d) = 0.0474679, would give 0.9536)
    assert quality_score(d[:1], p[:1], "kl") == pytest.approx(np.exp(-0.0400781), abs=1e-6)


def test_quality_score():
    d = np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    assert quality_score(d, d, "corr") == pytest.approx(1.0)
    assert quality_score(d, d[:, ::-1], "corr") == 0.0  # anti-correlated rows clip to 0
    assert quality_score(d, d, "kl") == pytest.approx(1.0)
    p = np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    assert quality_score(d, p, "kl") == pytest.approx(np.exp(-ldl_metrics(d, p)["kl"]))
    with pytest.raises(ValueError, match="quality estimator"):
        quality_score(d, p, "oracle")


def test_corruption_model():
    rng = np.random.default_rng(0)
    d = rng.dirichlet(np.ones(6), size=200)
    np.testing.assert_allclose(corrupt(d, 0.0), d, rtol=1e-6)
    for kind in ("combined", "annotators", "noise", "sharpen", "random-mix"):
        out = corrupt(d, 0.8, kind, np.random.default_rng(1))
        assert out.shape == d.shape and (out >= 0).all()
        np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-5)
        assert ldl_metrics(d, out)["kl"] > 0.05, kind  # really corrupted
    # more corruption, further from the clean labels
    kls = [
        ldl_metrics(d, corrupt(d, s, "combined", np.random.default_rng(2)))["kl"]
        for s in (0.2, 0.9)
    ]
    assert kls[0] < kls[1]
    ent = lambda p: float(-(p * np.log(np.maximum(p, 1e-12))).sum(1).mean())  # noqa: E731
    assert ent(corrupt(d, 0.5, "sharpen")) < ent(d)
    assert num_annotators(0.0) == 50 and num_annotators(1.0) == 1
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(d, 0.5, "blur")


def test_corruption_stages_hand_computed():
    d = np.array([[0.5, 0.3, 0.2]])
    # sharpen at level 1/9: exponent 1 + 9/9 = 2: (.25, .09, .04) / .38
    np.testing.assert_allclose(
        corrupt(d, 1 / 9, "sharpen"), [[0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]], rtol=1e-6
    )
    rng = np.random.default_rng(0)
    dd = rng.dirichlet(np.ones(6), size=4000)
    # random-mix at .5: (1 - .4) d + .4 r, r ~ Dirichlet(1) from the same seeded source
    r = np.random.default_rng(7).dirichlet(np.ones(6), size=len(dd))
    out = corrupt(dd, 0.5, "random-mix", np.random.default_rng(7))
    np.testing.assert_allclose(out, 0.6 * dd + 0.4 * r, rtol=1e-5, atol=1e-7)
    # noise at level s: a fraction s / 2 of the rows is a permutation of the clean row
    for level in (0.5, 1.0):
        out = corrupt(dd, level, "noise", np.random.default_rng(3))
        np.testing.assert_allclose(np.sort(out, 1), np.sort(dd, 1), rtol=1e-5, atol=1e-7)
        moved = np.abs(out - dd).max(1) > 1e-6
        assert abs(moved.mean() - level / 2) < 0.03, (level, moved.mean())
    # annotators at .5: round(50 ** .5) = 7 votes, histogram (counts + .1 / 6) / 7.1
    out = corrupt(dd[:50], 0.5, "annotators", np.random.default_rng(4)).astype(np.float64)
    counts = out * 7.1 - 0.1 / 6
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)
    np.testing.assert_allclose(counts.sum(1), 7.0, atol=1e-4)
    assert num_annotators(0.5) == 7 and num_annotators(0.3) == 15 and num_annotators(0.9) == 1
    # combined: sharpen, then annotators, then noise, then random-mix, one random source
    g = np.random.default_rng(5)
    want = _random_mix(_noise(_votes(_sharpen(dd, 0.6), 5, g, 0.1), 0.6, g), 0.6, g)
    out = corrupt(dd, 0.6, "combined", np.random.default_rng(5))
    assert num_annotators(0.6) == 5
    np.testing.assert_allclose(out, want / want.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_client_levels():
    lv = client_levels(5, 0.4, 0.9, 0.5, seed=3)
    assert sorted(lv) == pytest.approx([0.0, 0.0, 0.45, 0.675, 0.9])
    assert client_levels(5, 0.4, 0.9, 0.5, seed=3) == lv  # a function of the seed
    assert client_levels(4, 1.0, 0.9, 0.5, seed=0) == [0.0] * 4
