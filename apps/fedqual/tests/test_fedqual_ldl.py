"""fedqual/ldl.py: the six LDL measures against hand-computed values, losses, corruption model."""

import numpy as np
import pytest
import torch

from flowerbed.common.testing import app_path

app_path("fedqual")
from fedqual.ldl import (  # noqa: E402
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


def test_client_levels():
    lv = client_levels(5, 0.4, 0.9, 0.5, seed=3)
    assert sorted(lv) == pytest.approx([0.0, 0.0, 0.45, 0.675, 0.9])
    assert client_levels(5, 0.4, 0.9, 0.5, seed=3) == lv  # a function of the seed
    assert client_levels(4, 1.0, 0.9, 0.5, seed=0) == [0.0] * 4
