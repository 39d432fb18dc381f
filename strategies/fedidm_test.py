"""FedIDM (Reconstruction) on crafted replies: each rejection rule, the fallback, the trusted
pool, rectification and the synthetic-set checks.

The model is a vector ``w``; the "condensed-data training" moves ``w`` towards the mean of the
pooled synthetic points (``g_0 = mean(x) - w``), the loss is the squared distance of ``w`` to
that mean, and the "prediction" of a point is its first coordinate rounded (so labels can be
checked by hand).
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flowerbed.common.testing import FakeGrid, mock_reply
from flowerbed.strategies.fedidm import FedIDM, FedIDMError, cosines, rejection


def _train(rnd, arrays, x, y):
    return ArrayRecord({"w": Array(x.mean(0).astype(np.float32))})


def _loss(arrays, x, y):
    return float(((arrays["w"].numpy() - x.mean(0)) ** 2).sum())


def _predict(arrays, x):
    return np.clip(np.rint(x[:, 0]), 0, 2).astype(np.int64)


def _reply(node, w, sx=((1.0, 1.0),), sy=(1,), n=10):
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.float32(w))}),
            "synthetic": ArrayRecord(
                {"x": Array(np.float32(sx)), "y": Array(np.asarray(sy, dtype=np.int64))}
            ),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return mock_reply(content, node_id=node)


def _strategy(**kw):
    s = FedIDM(_train, _loss, _predict, 3, min_train_nodes=1, min_available_nodes=1, **kw)
    glob = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    list(s.configure_train(1, glob, ConfigRecord({}), FakeGrid([1, 2, 3, 4])))
    return s


def test_rejection_rules_by_hand():
    # cos: -0.5 < 0 -> direction; rises (0, 0.1, 0.2, 5): median 0.15, MAD 0.1 -> tau 0.65
    reasons, tau = rejection(np.array([1.0, -0.5, 0.9, 0.8]), np.array([0.0, 0.1, 0.2, 5.0]))
    assert tau == pytest.approx(0.65)
    assert rejection(np.ones(4), np.array([0.0, 0.1, 0.2, 5.0]), mad_c=2.0)[1] == pytest.approx(
        0.35
    )
    assert reasons[0] is None and reasons[2] is None
    assert reasons[1].startswith("direction") and reasons[3].startswith("loss")
    # the loss threshold is never below 0: a rise of 0.01 when all others fall is rejected
    reasons, tau = rejection(np.ones(3), np.array([-1.0, -1.0, 0.01]), mad_c=0.0)
    assert tau == 0.0 and reasons[2].startswith("loss")
    np.testing.assert_allclose(
        cosines(np.array([[1.0, 0.0], [0.0, 3.0]]), np.array([1.0, 1.0])), [2**-0.5, 2**-0.5]
    )


def test_opposite_direction_and_loss_rise_are_rejected_with_reasons():
    s = _strategy()
    # condensed mean (1, 1): g_0 = (1, 1), L(w) = 2
    reps = [
        _reply(1, [1.0, 1.0]),  # on target: loss 0
        _reply(2, [0.8, 1.2]),  # close
        _reply(3, [-2.0, -2.0]),  # opposite direction
        _reply(4, [9.0, 0.5]),  # cos > 0 but loss (8^2 + 0.5^2) rises
    ]
    arrays, _ = s.aggregate_train(1, reps)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.9, 1.1])  # mean of nodes 1, 2
    row = s.history[1]
    assert row["rejected_nodes"] == [3, 4]
    assert row["reject_reasons"]["3"].startswith("direction")
    assert row["reject_reasons"]["4"].startswith("loss")
    assert s.trusted == {1, 2} and row["fallback_used"] is False
    # per-node diagnostics: cos to g_0 and loss rise on the condensed set
    assert row["cos"]["3"] == pytest.approx(-1.0) and row["cos"]["1"] == pytest.approx(1.0)
    assert row["rise"]["1"] == pytest.approx(-2.0) and row["rise"]["4"] == pytest.approx(62.25)


def test_fallback_condensed_or_keep_when_all_rejected():
    reps = [_reply(1, [-1.0, -1.0]), _reply(2, [-3.0, 0.0])]
    s = _strategy(fallback="condensed")
    arrays, _ = s.aggregate_train(1, reps)
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.0])  # w + g_0
    assert s.history[1]["fallback_used"] is True
    s = _strategy(fallback="keep")
    assert s.aggregate_train(1, reps)[0] is None
    with pytest.raises(FedIDMError, match="fallback='median'"):
        FedIDM(_train, _loss, _predict, 3, fallback="median")


def test_clip_to_g0_norm():
    s = _strategy(clip=True, mad_c=100.0)
    arrays, _ = s.aggregate_train(1, [_reply(1, [2.0, 2.0])])  # ||g_0|| = sqrt 2
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.0], rtol=1e-6)


def test_finetune_trains_the_aggregate_on_the_condensed_set():
    def half(rnd, arrays, x, y):  # halfway from w to the condensed mean
        w = arrays["w"].numpy()
        return ArrayRecord({"w": Array(np.float32(w + 0.5 * (x.mean(0) - w)))})

    reps = [_reply(1, [2.0, 2.0]), _reply(2, [2.0, 2.0])]  # g_0 = (0.5, 0.5), rises 0: accepted
    glob = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    for finetune, want in ((False, [2.0, 2.0]), (True, [1.5, 1.5])):
        s = FedIDM(half, _loss, _predict, 3, finetune=finetune, min_available_nodes=1)
        list(s.configure_train(1, glob, ConfigRecord({}), FakeGrid([1, 2])))
        np.testing.assert_allclose(s.aggregate_train(1, reps)[0]["w"].numpy(), want)


def test_finetune_from_round_two_skips_the_round_one_pool():
    def half(rnd, arrays, x, y):  # halfway from w to the condensed mean
        w = arrays["w"].numpy()
        return ArrayRecord({"w": Array(np.float32(w + 0.5 * (x.mean(0) - w)))})

    reps = [_reply(1, [2.0, 2.0]), _reply(2, [2.0, 2.0])]  # pool mean (1, 1), both accepted
    glob = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    s = FedIDM(half, _loss, _predict, 3, finetune=True, finetune_from=2, min_available_nodes=1)
    list(s.configure_train(1, glob, ConfigRecord({}), FakeGrid([1, 2])))
    new = s.aggregate_train(1, reps)[0]  # round 1: the plain mean (2, 2), no server training
    np.testing.assert_allclose(new["w"].numpy(), [2.0, 2.0])
    assert s.history[1]["finetuned"] is False
    list(s.configure_train(2, new, ConfigRecord({}), FakeGrid([1, 2])))
    # round 2: pool mean (4, 4), g_0 = (1, 1) = each update: accepted; the mean (3, 3), then
    # halfway to (4, 4)
    sx, sy = ((4.0, 4.0),), (2,)
    reps = [_reply(1, [3.0, 3.0], sx=sx, sy=sy), _reply(2, [3.0, 3.0], sx=sx, sy=sy)]
    np.testing.assert_allclose(s.aggregate_train(2, reps)[0]["w"].numpy(), [3.5, 3.5])
    assert s.history[2]["finetuned"] is True and s.history[2]["num_accepted"] == 2


def test_client_rectification_drops_a_label_flipped_set():
    # the model predicts the first coordinate: nodes 1-4 agree with 2/2, 1/2, 2/2, 0/2 labels;
    # median 0.75, threshold 0.6 * 0.75 = 0.45: only node 4's set is dropped (0.6 without the
    # median would drop node 2's too)
    sx = ((1.0, 1.0), (2.0, 2.0))
    reps = [
        _reply(1, [1.0, 1.0], sx=sx, sy=(1, 2)),
        _reply(2, [1.0, 1.0], sx=sx, sy=(1, 0)),
        _reply(3, [1.0, 1.0], sx=sx, sy=(1, 2)),
        _reply(4, [1.0, 1.0], sx=sx, sy=(0, 0)),
    ]
    s = _strategy(rectify="client", rectify_min_agree=0.6)
    s.aggregate_train(1, reps)
    row = s.history[1]
    assert row["rectify_dropped"] == [4] and row["rectified"]
    assert row["condensed_pool"] == 8 and row["condensed_size"] == 6
    assert row["label_agreement"] == pytest.approx(0.75)
    s = _strategy(rectify="none")
    s.aggregate_train(1, reps)
    assert s.history[1]["condensed_size"] == 8 and not s.history[1]["rectified"]
    with pytest.raises(FedIDMError, match="rectify='all'"):
        FedIDM(_train, _loss, _predict, 3, rectify="all")


def test_pool_of_trusted_clients_only():
    s = _strategy()
    s.trusted = {1}
    # node 2's synthetic set (3, 3) would pull g_0 to (2, 2); only node 1's (1, 1) counts
    reps = [_reply(1, [1.0, 1.0]), _reply(2, [1.0, 1.0], sx=((2.0, 3.0),), sy=(2,))]
    s.aggregate_train(1, reps)
    assert s.history[1]["condensed_pool"] == 1 and s.history[1]["g0_norm"] == pytest.approx(2**0.5)


def test_rectification_drops_disagreeing_labels_once_the_model_agrees():
    s = _strategy(rectify="sample")
    # points with first coordinate 1 and 2; labels 1, 2, 0: model agrees with 2 of 3
    reps = [_reply(1, [1.0, 1.0], sx=((1.0, 1.0), (2.0, 2.0), (1.0, 5.0)), sy=(1, 2, 0))]
    s.aggregate_train(1, reps)
    row = s.history[1]
    assert row["rectified"] and row["condensed_pool"] == 3 and row["condensed_size"] == 2
    s = _strategy(rectify="sample", rectify_min_agree=0.9)
    s.aggregate_train(1, reps)
    assert not s.history[1]["rectified"] and s.history[1]["condensed_size"] == 3


@pytest.mark.parametrize(
    "sx, sy, why",
    [
        (((np.nan, 1.0),), (1,), "synthetic set not finite"),
        (((1.0, 1.0),), (7,), "synthetic labels outside [0, 3)"),
        (((1.0, 1.0),), (1, 2), "synthetic set shapes"),
    ],
)
def test_malformed_synthetic_set_is_rejected_by_name(sx, sy, why):
    s = _strategy()
    good = _reply(1, [1.0, 1.0])
    arrays, _ = s.aggregate_train(1, [good, _reply(2, [5.0, 5.0], sx=sx, sy=sy)])
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.0])  # the global model is clean
    assert s.history[1]["num_rejected"] == 1
    assert any(why in r for r in s.history[1]["failure_reasons"])
    plain = mock_reply(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.float32([1, 1]))}),
                "metrics": MetricRecord({"num-examples": 3}),
            }
        ),
        node_id=3,
    )
    assert s.check_reply(plain, True) == "no synthetic set"
