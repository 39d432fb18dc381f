"""FedDistr units: alignment (matching, merging, consolidation) with fixed inputs, partitions,
upload checks, config errors, and a direct ClientApp call with the tiny generator."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from flowerbed.common.config import ConfigError
from flowerbed.common.testing import app_path, mock_reply

app_path("feddistr")
from feddistr import align, task  # noqa: E402
from feddistr.align import Dist  # noqa: E402


def d(mean, label=0, count=10, logstd=(0.0, 0.0), src=0):
    return Dist(np.array(mean, float), np.array(logstd, float), label, count, [src])


def test_cosine_matrix_hand_values():
    s = align.cosine(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 2.0], [3.0, 0.0]]))
    np.testing.assert_allclose(s, [[0.0, 1.0], [2**-0.5, 2**-0.5]])


def test_match_is_hungarian_not_greedy():
    # greedy on the best entry (0.9 at (0,0)) would force (1,1)=0.1: total 1.0;
    # the assignment (0,1)+(1,0) has total 0.8+0.8=1.6 and is the optimum
    sim = np.array([[0.9, 0.8], [0.8, 0.1]])
    assert align.match(sim, threshold=0.5) == [(0, 1), (1, 0)]
    # the threshold drops weak pairs; the mask forbids pairs
    assert align.match(sim, threshold=0.85) == []
    allowed = np.array([[True, False], [True, True]])  # forbids (0,1): (0,0)+(1,1), 0.1 dropped
    assert align.match(sim, threshold=0.5, allowed=allowed) == [(0, 0)]
    assert align.match(np.zeros((0, 3)), 0.5) == []


def test_merge_moment_matching_by_hand():
    a = Dist(np.array([0.0]), np.array([0.0]), 3, 30, [0])  # N(0, 1), 30 samples
    b = Dist(np.array([2.0]), np.array([np.log(2.0)]), 3, 10, [1])  # N(2, 4), 10 samples
    m = align.merge(a, b)
    # mean = .75*0 + .25*2 = .5 ; E[x^2] = .75*1 + .25*(4+4) = 2.75 ; var = 2.75 - .25 = 2.5
    np.testing.assert_allclose(m.mean, [0.5])
    np.testing.assert_allclose(np.exp(2 * m.logstd), [2.5])
    assert (m.count, m.label, m.sources) == (40, 3, [0, 1])


def test_consolidate_merges_parallel_keeps_orthogonal():
    c0 = [d([1, 0], label=0, src=0), d([0, 1], label=1, src=0)]
    c1 = [d([0.1, 1], label=1, count=30, src=1), d([1, 0.05], label=0, src=1)]
    c2 = [d([-1, 0], label=2, src=2)]  # orthogonal: a new base distribution
    out, merges = align.consolidate([c0, c1, c2], threshold=0.5)
    assert merges == 2 and len(out) == 3
    assert [(x.label, x.count, x.sources) for x in out] == [
        (0, 20, [0, 1]),
        (1, 40, [0, 1]),
        (2, 10, [2]),
    ]
    np.testing.assert_allclose(out[1].mean, [0.075, 1.0])


def test_consolidate_same_label_rule_and_threshold():
    a, b = [d([1, 0], label=0)], [d([1, 0], label=1, src=1)]
    out, merges = align.consolidate([a, b], threshold=0.5, same_label=True)
    assert merges == 0 and len(out) == 2  # identical parameters, different classes: kept
    out, merges = align.consolidate([a, b], threshold=0.5, same_label=False)
    assert merges == 1 and len(out) == 1
    out, merges = align.consolidate([a, [d([0, 1], label=0)]], threshold=0.5)
    assert merges == 0 and len(out) == 2  # same class, orthogonal parameters: two modes


def test_partitions_disentangled_near_entangled():
    y = np.repeat(np.arange(10), 50)
    parts = task.disentangled(y, 5, seed=1)
    classes = [set(y[p]) for p in parts]
    assert all(len(c) == 2 for c in classes)
    assert set().union(*classes) == set(range(10)) and sum(map(len, parts)) == 500
    near = task.near_disentangled(y, 5, seed=1, xi=0.2)
    assert sum(map(len, near)) == 500 and len(set(np.concatenate(near))) == 500
    for p, own in zip(near, classes, strict=True):
        dominant = np.isin(y[p], list(own)).mean()
        assert 0.6 < dominant < 0.95  # ~ (1 - xi) of a client's data is its own group
    assert [list(p) for p in task.near_disentangled(y, 5, 1, 0.0)] == [list(p) for p in parts]
    with pytest.raises(ValueError, match="11 clients > 10 classes"):
        task.disentangled(y, 11, seed=0)


def test_check_upload_rejects_bad_uploads():
    ok = {
        "mean": np.zeros((2, 4), np.float32),
        "logstd": np.zeros((2, 4), np.float32),
        "label": np.array([0, 3]),
        "count": np.array([5, 6]),
    }
    assert task.check_upload(ok, 4) is None
    assert "shapes" in task.check_upload({**ok, "mean": np.zeros((2, 5))}, 4)
    bad = ok["mean"].copy()
    bad[0, 0] = np.nan
    assert "NaN" in task.check_upload({**ok, "mean": bad}, 4)
    assert "labels" in task.check_upload({**ok, "label": np.array([0, 10])}, 4)
    assert "counts" in task.check_upload({**ok, "count": np.array([0, 1])}, 4)
    assert "lacks" in task.check_upload({"mean": ok["mean"]}, 4)


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"method": "scaffold"}, "method='scaffold'"),
        ({"partition": "iid"}, "partition='iid'"),
        ({"xi": 1.5}, "xi=1.5"),
        ({"train-size": 60000}, "train-size=60000"),
        ({"no-such-key": 1}, "unknown run config key 'no-such-key'"),
    ],
)
def test_bad_run_config_names_the_value(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        task.parse_config(bad)


TINY = {
    "generator": "tiny",
    "train-size": 300,
    "test-size": 300,
    "inversion-steps": 3,
    "partition": "near",
}


def test_client_upload_direct_call_is_one_small_deterministic_message():
    from feddistr import client_app

    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 1, "num-partitions": 3},
        state=RecordDict(),
        run_config=dict(TINY),
    )
    msg = mock_reply(RecordDict({"config": ConfigRecord({"server-round": 1})}))
    out = client_app.train_handler(msg, ctx).content
    arr = {k: v.numpy() for k, v in out["arrays"].items()}
    assert task.check_upload(arr, 8) is None
    _, y = task.client_data(task.parse_config(TINY), 1, 3)
    labels = arr["label"].tolist()
    assert set(labels) == set(y.tolist())  # every local class is described ...
    assert max(labels.count(c) for c in set(labels)) <= 3  # ... by <= clusters-per-class dists
    assert arr["count"].sum() == len(y) == out["metrics"]["num-examples"]
    assert out["metrics"]["partition-id"] == 1
    from flowerbed.common.records import content_nbytes

    assert content_nbytes(out) < 2000  # 10 x (8 + 8) floats + labels + counts + metrics
    again = {k: v.numpy() for k, v in client_app.train_handler(msg, ctx).content["arrays"].items()}
    np.testing.assert_array_equal(arr["mean"], again["mean"])


def test_fedavg_baseline_client_changes_the_model():
    from feddistr import client_app

    from flowerbed.common.records import to_record

    cfg = {**TINY, "method": "fedavg"}
    model = task.make_model(task.parse_config(cfg))
    content = RecordDict({"arrays": to_record(model), "config": ConfigRecord({"server-round": 1})})
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config=cfg,
    )
    out = client_app.train_handler(mock_reply(content), ctx).content
    assert out["metrics"]["steps"] > 0
    w0 = model.state_dict()["classifier.3.weight"]
    w1 = out["arrays"].to_torch_state_dict()["classifier.3.weight"]
    assert not torch.equal(w0, w1)
