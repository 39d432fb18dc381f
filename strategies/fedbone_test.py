"""FedBone's GPAggregation on hand-made gradients, and its reply checks on mock replies."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from flowerbed.common.testing import mock_reply
from flowerbed.strategies.fedbone import (
    FedBone,
    attention_weights,
    check_tensor,
    conflict_rate,
    gp_aggregate,
    mean_by_key,
    pairwise_cosines,
    pcgrad,
    projection_effect,
    step_diagnostics,
    tensor_record,
    update_history,
)

RNG = np.random.default_rng(0)


def test_pcgrad_projects_a_conflicting_pair_by_hand():
    # g1.g2 = -1 - 0 = -1 < 0 (conflict); ||g2||^2 = 1, ||g1||^2 = 2
    g1, g2 = np.array([1.0, 1.0]), np.array([-1.0, 0.0])
    p1, p2 = pcgrad([g1, g2], RNG)
    # g1 - (-1/1) g2 = (1, 1) + (-1, 0) = (0, 1)
    np.testing.assert_allclose(p1, [0.0, 1.0])
    # g2 - (-1/2) g1 = (-1, 0) + (0.5, 0.5) = (-0.5, 0.5)
    np.testing.assert_allclose(p2, [-0.5, 0.5])
    # after projection each is orthogonal to the other's original gradient
    assert abs(p1 @ g2) < 1e-12 and abs(p2 @ g1) < 1e-12


def test_pcgrad_uses_the_original_gradients_of_the_others():
    # three gradients; g1 conflicts with g2 and g3. Projections against the ORIGINAL g2, g3:
    g1, g2, g3 = np.array([1.0, 0.0]), np.array([-1.0, 1.0]), np.array([-1.0, -1.0])
    p1 = pcgrad([g1, g2, g3], np.random.default_rng(1))[0]
    # order g2 then g3: (1,0) - (-1/2)(-1,1) = (0.5, 0.5); . g3 = -1 < 0: - (-1/2)(-1,-1) = (0, 0)
    # order g3 then g2: (1,0) - (-1/2)(-1,-1) = (0.5,-0.5); . g2 = -1 < 0: + 0.5(-1,1) = (0, 0)
    np.testing.assert_allclose(p1, [0.0, 0.0], atol=1e-12)


def test_pcgrad_leaves_non_conflicting_gradients_untouched():
    gs = [np.array([1.0, 0.5]), np.array([0.2, 1.0]), np.array([0.0, 3.0])]
    out = pcgrad(gs, RNG)
    for a, b in zip(out, gs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_conflict_rate_on_a_hand_made_set():
    # pairs: (a,b) cos<0, (a,c) cos>0, (b,c) cos=0 (orthogonal: no conflict) -> 1/3
    a, b, c = np.array([1.0, 0.0]), np.array([-1.0, 0.0]), np.array([0.0, 2.0])
    assert conflict_rate([a, b, c]) == pytest.approx(1 / 3)
    assert conflict_rate([a, -a, a, -a]) == pytest.approx(4 / 6)
    assert conflict_rate([a]) == 0.0


def test_attention_weights_sum_to_one_and_favour_aligned_clients():
    h = np.array([1.0, 0.0])
    gs = [np.array([2.0, 0.0]), np.array([0.0, 1.0]), np.array([-3.0, 0.0])]
    w = attention_weights(gs, h)
    assert w.sum() == pytest.approx(1.0)
    # cos = (1, 0, -1): softmax by hand
    e = np.exp([1.0, 0.0, -1.0])
    np.testing.assert_allclose(w, e / e.sum())
    assert w[0] > w[1] > w[2]
    # no history: uniform
    np.testing.assert_allclose(attention_weights(gs, None), [1 / 3] * 3)


def test_gp_aggregate_each_switch_by_hand():
    g1, g2 = np.array([1.0, 1.0]), np.array([-1.0, 0.0])
    # plain averaging
    g, info = gp_aggregate([g1, g2], None, attention=False, projection=False)
    np.testing.assert_allclose(g, [0.0, 0.5])
    assert info["conflict_rate"] == 1.0
    # projection only: mean of (0, 1) and (-0.5, 0.5)
    g, _ = gp_aggregate([g1, g2], None, attention=False, projection=True)
    np.testing.assert_allclose(g, [-0.25, 0.75])
    # attention without history is uniform: same as projection only
    g, info = gp_aggregate([g1, g2], None, attention=True, projection=True)
    np.testing.assert_allclose(g, [-0.25, 0.75])
    np.testing.assert_allclose(info["alpha"], [0.5, 0.5])
    # attention with history h = (0, 1): cos = (1/sqrt2, 0); g_k <- 2 alpha_k g_k
    h = np.array([0.0, 1.0])
    a = np.exp([1 / np.sqrt(2), 0.0])
    a /= a.sum()
    s1, s2 = 2 * a[0] * g1, 2 * a[1] * g2
    g, info = gp_aggregate([g1, g2], h, attention=True, projection=False)
    np.testing.assert_allclose(g, (s1 + s2) / 2)
    np.testing.assert_allclose(info["alpha"], a)
    # attention + projection: PCGrad of the rescaled pair (projection is scale-free in g_j)
    p1 = s1 - (s1 @ s2) / (s2 @ s2) * s2
    p2 = s2 - (s2 @ s1) / (s1 @ s1) * s1
    g, _ = gp_aggregate([g1, g2], h, attention=True, projection=True)
    np.testing.assert_allclose(g, (p1 + p2) / 2)


def test_projection_effect_by_hand():
    # the pair of the PCGrad test: plain mean (0, 0.5), projected mean (-0.25, 0.75)
    g1, g2 = np.array([1.0, 1.0]), np.array([-1.0, 0.0])
    plain, proj = np.array([0.0, 0.5]), np.array([-0.25, 0.75])
    eff = projection_effect([g1, g2], plain, proj)
    # ||(-0.25, 0.25)|| / 0.5 = sqrt(0.125) / 0.5
    assert eff["pc_change"] == pytest.approx(np.sqrt(0.125) / 0.5)
    # cos((-0.25, 0.75), (0, 0.5)) = 0.375 / (sqrt(0.625) * 0.5)
    assert eff["pc_cos"] == pytest.approx(0.375 / (np.sqrt(0.625) * 0.5))
    # ||plain|| / mean(||g1||, ||g2||) = 0.5 / ((sqrt2 + 1) / 2)
    assert eff["cancel"] == pytest.approx(0.5 / ((np.sqrt(2) + 1) / 2))
    np.testing.assert_allclose(eff["cos"], [-1 / np.sqrt(2)])
    # gp_aggregate reports the same effect whether or not it projects
    for projection in (False, True):
        _, info = gp_aggregate([g1, g2], None, attention=False, projection=projection)
        assert info["pc_change"] == pytest.approx(eff["pc_change"])
    # no conflict: projection changes nothing; opposite equal gradients cancel completely
    _, info = gp_aggregate([g1, 2 * g1], None, attention=False, projection=False)
    assert info["pc_change"] == 0.0 and info["cancel"] == pytest.approx(1.0)
    assert projection_effect([g1, -g1], np.zeros(2), np.zeros(2))["cancel"] == 0.0


def test_pairwise_cosines_order_and_step_diagnostics():
    a, b, c = np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([-1.0, 0.0])
    # pairs (a,b), (a,c), (b,c)
    np.testing.assert_allclose(pairwise_cosines([a, b, c]), [0.0, -1.0, 0.0])
    diag = {"pc_change": 0.5, "pc_cos": 0.9, "cancel": 0.3, "cos": [0.1, -0.2, 0.3]}
    rows = step_diagnostics(
        [
            {**diag, "grad_norm": [1.0, 2.0, 3.0], "tasks": ["cls", "seg", "cls"]},
            {
                **diag,
                "pc_change": 0.25,
                "grad_norm": [1.0, 2.0, 3.0],
                "tasks": ["cls", "seg", "cls"],
            },
        ]
    )
    assert rows["pc_change_steps"] == [0.5, 0.25] and rows["cos_steps"][1] == [0.1, -0.2, 0.3]
    assert rows["pair_tasks"] == ["cls|seg", "cls|cls", "seg|cls"]
    assert step_diagnostics([]) == {}


def test_update_history_ema():
    h = update_history(None, np.array([2.0, 0.0]), 0.5)
    np.testing.assert_allclose(h, [2.0, 0.0])
    np.testing.assert_allclose(update_history(h, np.array([0.0, 4.0]), 0.5), [1.0, 2.0])
    np.testing.assert_allclose(update_history(h, np.array([0.0, 4.0]), 0.0), [0.0, 4.0])


def test_mean_by_key_averages_each_task_over_its_own_clients():
    recs = [
        RecordDict({"metrics": MetricRecord({"cls_accuracy": 0.5, "num-examples": 10})}),
        RecordDict({"metrics": MetricRecord({"cls_accuracy": 1.0, "num-examples": 30})}),
        RecordDict({"metrics": MetricRecord({"seg_iou": 0.2, "num-examples": 20})}),
    ]
    m = mean_by_key(recs)
    assert m["cls_accuracy"] == pytest.approx((5 + 30) / 40)
    assert m["seg_iou"] == pytest.approx(0.2) and m["num-examples"] == 60


def _reply(t, loss=1.0):
    content = RecordDict(
        {
            "grad": tensor_record(t=t),
            "metrics": MetricRecord({"loss": loss}),
            "config": ConfigRecord({"task": "cls"}),
        }
    )
    return mock_reply(content)


def test_check_tensor_names_each_rejection():
    ok = np.zeros((2, 3, 4, 4), np.float32)
    assert check_tensor(_reply(ok), "grad", (2, 3, 4, 4)) is None
    assert check_tensor(_reply(ok), "grad", None, (3, 4, 4)) is None
    assert check_tensor(_reply(ok), "grad", (2, 3, 4, 5)) == (
        "grad has shape (2, 3, 4, 4), expected (2, 3, 4, 5)"
    )
    assert check_tensor(_reply(ok), "grad", None, (3, 4, 5)) == (
        "grad has shape (2, 3, 4, 4), expected (batch, 3, 4, 5)"
    )
    bad = ok.copy()
    bad[0, 0, 0, 0] = np.nan
    assert check_tensor(_reply(bad), "grad", (2, 3, 4, 4)) == "grad contains NaN/Inf"
    assert check_tensor(_reply(ok, float("inf")), "grad", (2, 3, 4, 4)) == "loss is not finite"
    assert check_tensor(_reply(ok), "embed", None) == "no tensor 'embed'/'t'"


def test_fedbone_checks_its_fractions():
    with pytest.raises(ValueError, match=r"fraction_train=0.0: must be in \(0, 1\]"):
        FedBone(None, fraction_train=0.0)
    with pytest.raises(ValueError, match=r"history_beta=1.0"):
        FedBone(None, history_beta=1.0)
