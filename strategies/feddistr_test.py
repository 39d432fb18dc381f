"""FedDistr strategy with mock replies: alignment by hand, allocation, upload checks, one round."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flowerbed.common.protocol import Protocol, ProtocolError
from flowerbed.common.testing import FakeGrid, mock_reply
from flowerbed.strategies import feddistr as F
from flowerbed.strategies.feddistr import Dist, FedDistr


def d(mean, label=0, count=10, logstd=(0.0, 0.0), src=0):
    return Dist(np.array(mean, float), np.array(logstd, float), label, count, [src])


# ---------------------------------------------------------------------------- alignment
def test_cosine_matrix_hand_values():
    s = F.cosine(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 2.0], [3.0, 0.0]]))
    np.testing.assert_allclose(s, [[0.0, 1.0], [2**-0.5, 2**-0.5]])


def test_match_is_hungarian_not_greedy():
    # greedy on the best entry (0.9 at (0,0)) would force (1,1)=0.1: total 1.0;
    # the assignment (0,1)+(1,0) has total 0.8+0.8=1.6 and is the optimum
    sim = np.array([[0.9, 0.8], [0.8, 0.1]])
    assert F.match(sim, threshold=0.5) == [(0, 1), (1, 0)]
    # the threshold drops weak pairs; the mask forbids pairs
    assert F.match(sim, threshold=0.85) == []
    allowed = np.array([[True, False], [True, True]])  # forbids (0,1): (0,0)+(1,1), 0.1 dropped
    assert F.match(sim, threshold=0.5, allowed=allowed) == [(0, 0)]
    assert F.match(np.zeros((0, 3)), 0.5) == []


def test_merge_moment_matching_by_hand():
    a = Dist(np.array([0.0]), np.array([0.0]), 3, 30, [0])  # N(0, 1), 30 samples
    b = Dist(np.array([2.0]), np.array([np.log(2.0)]), 3, 10, [1])  # N(2, 4), 10 samples
    m = F.merge(a, b)
    # mean = .75*0 + .25*2 = .5 ; E[x^2] = .75*1 + .25*(4+4) = 2.75 ; var = 2.75 - .25 = 2.5
    np.testing.assert_allclose(m.mean, [0.5])
    np.testing.assert_allclose(np.exp(2 * m.logstd), [2.5])
    assert (m.count, m.label, m.sources) == (40, 3, [0, 1])


def test_consolidate_merges_parallel_keeps_orthogonal():
    c0 = [d([1, 0], label=0, src=0), d([0, 1], label=1, src=0)]
    c1 = [d([0.1, 1], label=1, count=30, src=1), d([1, 0.05], label=0, src=1)]
    c2 = [d([-1, 0], label=2, src=2)]  # orthogonal: a new base distribution
    out, merges = F.consolidate([c0, c1, c2], threshold=0.5)
    assert merges == 2 and len(out) == 3
    assert [(x.label, x.count, x.sources) for x in out] == [
        (0, 20, [0, 1]),
        (1, 40, [0, 1]),
        (2, 10, [2]),
    ]
    np.testing.assert_allclose(out[1].mean, [0.075, 1.0])


def test_consolidate_same_label_rule_and_threshold():
    a, b = [d([1, 0], label=0)], [d([1, 0], label=1, src=1)]
    out, merges = F.consolidate([a, b], threshold=0.5, same_label=True)
    assert merges == 0 and len(out) == 2  # identical parameters, different classes: kept
    out, merges = F.consolidate([a, b], threshold=0.5, same_label=False)
    assert merges == 1 and len(out) == 1
    out, merges = F.consolidate([a, [d([0, 1], label=0)]], threshold=0.5)
    assert merges == 0 and len(out) == 2  # same class, orthogonal parameters: two modes


def test_allocate_splits_per_class_by_count():
    dists = [
        d([1, 0], label=2, count=30),
        d([0, 1], label=0, count=5),
        d([1, 1], label=2, count=10),
    ]
    got = [(x.label, x.count, n) for x, n in F.allocate(dists, 200)]
    # class 0 first (ascending); class 2: 200 * 30/40 = 150 and 200 * 10/40 = 50
    assert got == [(0, 5, 200), (2, 30, 150), (2, 10, 50)]
    assert [n for _, n in F.allocate([d([1, 0], count=1), d([0, 1], count=999)], 10)] == [1, 10]


def test_check_upload_rejects_bad_uploads():
    ok = {
        "mean": np.zeros((2, 4), np.float32),
        "logstd": np.zeros((2, 4), np.float32),
        "label": np.array([0, 3]),
        "count": np.array([5, 6]),
    }
    assert F.check_upload(ok, 4) is None
    assert "shapes" in F.check_upload({**ok, "mean": np.zeros((2, 5))}, 4)
    bad = ok["mean"].copy()
    bad[0, 0] = np.nan
    assert "NaN" in F.check_upload({**ok, "mean": bad}, 4)
    assert "labels" in F.check_upload({**ok, "label": np.array([0, 10])}, 4)
    assert "counts" in F.check_upload({**ok, "count": np.array([0, 1])}, 4)
    assert "lacks" in F.check_upload({"mean": ok["mean"]}, 4)


# ---------------------------------------------------------------------------- one round
class UploadGrid(FakeGrid):
    """Answers the upload phase with canned replies (node -> RecordDict); records what was sent."""

    def __init__(self, uploads: dict[int, RecordDict]):
        super().__init__(sorted(uploads))
        self.uploads = uploads
        self.sent = []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent += messages
        return [mock_reply(self.uploads[m.metadata.dst_node_id], node_id=m.metadata.dst_node_id)
                for m in messages]  # fmt: skip


def upload(pid, means, labels, counts, logstd=0.0):
    means = np.asarray(means, np.float32)
    arrays = {
        "mean": means,
        "logstd": np.full_like(means, logstd),
        "label": np.asarray(labels, np.int64),
        "count": np.asarray(counts, np.int64),
    }
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"partition-id": pid, "num-examples": int(sum(counts))}),
        }
    )


def _strategy(**kw):
    calls = {"sample": [], "train": None}

    def sample(mean, logstd, n):
        calls["sample"].append((np.asarray(mean).tolist(), n))
        return np.repeat(np.asarray(mean, np.float32)[None], n, axis=0)

    def train_classifier(xs, ys):
        calls["train"] = (np.concatenate(xs), list(ys))
        return ArrayRecord({"w": Array(np.array([float(len(ys))], np.float32))})

    s = FedDistr(2, sample, train_classifier, synthetic_per_class=10, **kw)
    return s, calls


def _round(s, grid):
    p = Protocol(grid)
    p.current_round = 1
    out = s.run_round(p, 1, ArrayRecord(), ConfigRecord(), ConfigRecord())
    return out, p


def test_one_round_uploads_aligns_synthesises_and_trains():
    # node 5 = partition 0, node 7 = partition 1: class 1 appears on both, parallel -> merged
    uploads = {
        7: upload(1, [[0.1, 1.0], [-1.0, 0.0]], [1, 2], [30, 10]),
        5: upload(0, [[1.0, 0.0], [0.0, 1.0]], [0, 1], [10, 10]),
    }
    grid = UploadGrid(uploads)
    prepared = []
    s, calls = _strategy(prepare=lambda: prepared.append(True))
    out, p = _round(s, grid)
    assert prepared == [True]
    # one message per node, carrying only the config with the round
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [5, 7]
    assert all(m.content["config"]["server-round"] == 1 for m in grid.sent)
    assert s.history[1]["num_uploaded"] == 4 and s.history[1]["num_consolidated"] == 3
    assert s.history[1]["num_merges"] == 1 and s.history[1]["num_rejected"] == 0
    # partition order: partition 0's class-1 distribution (count 10) absorbs partition 1's (30)
    merged = [x for x in s.consolidated if x.label == 1][0]
    assert merged.count == 40 and merged.sources == [0, 1]
    np.testing.assert_allclose(merged.mean, [0.075, 1.0], rtol=1e-6)
    # 10 samples per class, three classes; each sampled at its (merged) mean
    assert [n for _, n in calls["sample"]] == [10, 10, 10]
    x, y = calls["train"]
    assert y == [0] * 10 + [1] * 10 + [2] * 10 and x.shape == (30, 2)
    assert s.history[1]["synthetic_size"] == 30
    np.testing.assert_array_equal(out.arrays["w"].numpy(), [30.0])
    # bytes from the protocol layer: one upload phase, both directions counted
    row = p.rounds[1]
    assert row["phases"]["upload"]["num_replies"] == 2
    assert row["bytes_sent"] > 0 and row["bytes_received"] > row["bytes_sent"]


def test_noalign_ablation_keeps_every_distribution():
    uploads = {
        1: upload(0, [[1.0, 0.0]], [1], [10]),
        2: upload(1, [[1.0, 0.01]], [1], [10]),
    }
    s, calls = _strategy(align=False)
    _round(s, UploadGrid(uploads))
    assert s.history[1]["num_merges"] == 0 and s.history[1]["num_consolidated"] == 2
    assert [n for _, n in calls["sample"]] == [5, 5]
    s, calls = _strategy()  # aligned: the two parallel ones are one distribution
    _round(s, UploadGrid(uploads))
    assert s.history[1]["num_consolidated"] == 1 and [n for _, n in calls["sample"]] == [10]


def test_bad_uploads_are_rejected_with_reasons():
    bad = upload(1, [[np.nan, 0.0]], [1], [10])
    wrong_dim = upload(2, [[1.0, 0.0, 0.0]], [1], [10])
    no_pid = upload(3, [[1.0, 0.0]], [1], [10])
    del no_pid["metrics"]["partition-id"]
    uploads = {1: upload(0, [[1.0, 0.0]], [0], [10]), 2: bad, 3: wrong_dim, 4: no_pid}
    s, calls = _strategy()
    _, p = _round(s, UploadGrid(uploads))
    assert s.history[1]["num_rejected"] == 3 and s.history[1]["num_uploaded"] == 1
    reasons = " ".join(p.rounds[1]["phases"]["upload"]["failure_reasons"])
    assert "NaN" in reasons and "shapes" in reasons and "partition-id" in reasons
    assert calls["train"][1] == [0] * 10
    s, _ = _strategy(min_uploads=2)
    with pytest.raises(ProtocolError, match="1 valid upload"):
        _round(s, UploadGrid(uploads))


def test_invalid_parameters():
    with pytest.raises(ValueError, match="synthetic_per_class"):
        FedDistr(2, None, None, synthetic_per_class=0)
    with pytest.raises(ValueError, match="threshold"):
        FedDistr(2, None, None, threshold=1.5)


# ---------------------------------------------------------------------------- rigor (#13)
def test_merge_label_is_the_larger_count_and_a_on_ties():
    a = d([1.0, 0.0], label=1, count=5)
    b = d([1.0, 0.0], label=2, count=10)
    assert F.merge(a, b).label == 2 and F.merge(b, a).label == 2
    assert F.merge(d([1, 0], label=4, count=7), d([1, 0], label=6, count=7)).label == 4
    # the weights are the counts, not equal: 5/15 * 1 + 10/15 * 4 = 3
    m = F.merge(d([1.0], count=5, logstd=(0.0,)), d([4.0], count=10, logstd=(0.0,)))
    np.testing.assert_allclose(m.mean, [3.0])
    # E[x^2] = (1/3)(1 + 1) + (2/3)(1 + 16) = 12 ; var = 12 - 9 = 3
    np.testing.assert_allclose(np.exp(2 * m.logstd), [3.0])


def test_match_threshold_is_inclusive_and_masks_forbidden_pairs():
    sim = np.array([[0.5, 0.2], [0.2, 0.49]])
    assert F.match(sim, threshold=0.5) == [(0, 0)]  # 0.5 kept (>=), 0.49 dropped
    # a forbidden pair is never returned even if the assignment would pick it
    assert F.match(np.array([[0.9]]), 0.5, allowed=np.array([[False]])) == []


def test_allocate_rounds_to_nearest():
    # 10 * 1/3 = 3.33 -> 3, 10 * 2/3 = 6.67 -> 7 (floor would give 6)
    got = [n for _, n in F.allocate([d([1, 0], count=1), d([0, 1], count=2)], 10)]
    assert got == [3, 7]


def test_check_upload_shape_reasons():
    ok = {
        "mean": np.zeros((2, 4), np.float32),
        "logstd": np.zeros((2, 4), np.float32),
        "label": np.array([0, 9]),
        "count": np.array([1, 6]),
    }
    assert F.check_upload(ok, 4) is None  # label 9 and count 1 are valid
    assert "shapes" in F.check_upload({**ok, "logstd": np.zeros((1, 4))}, 4)
    assert "label/count" in F.check_upload({**ok, "label": np.array([0])}, 4)
    inf = ok["logstd"].copy()
    inf[1, 2] = np.inf
    assert "NaN or Inf" in F.check_upload({**ok, "logstd": inf}, 4)
    assert "labels" in F.check_upload({**ok, "label": np.array([-1, 0])}, 4)


def test_synthetic_labels_are_the_labels_of_their_conditions():
    # every synthetic sample is drawn from one consolidated distribution and carries its label
    uploads = {
        1: upload(0, [[1.0, 0.0], [0.0, 1.0], [0.3, -1.0]], [4, 7, 7], [10, 30, 10]),
        2: upload(1, [[-1.0, 0.2]], [2], [5]),
    }
    s, calls = _strategy()
    _round(s, UploadGrid(uploads))
    x, y = calls["train"]
    by_mean = {tuple(np.float32(c.mean)): c.label for c in s.consolidated}
    assert [by_mean[tuple(row)] for row in x] == y
    # class 7: 10 samples split 30:10 between its two distributions
    assert y == [2] * 10 + [4] * 10 + [7] * 10
    np.testing.assert_array_equal(x[20:28], np.repeat([[0.0, 1.0]], 8, axis=0))
    np.testing.assert_allclose(x[28:30], np.repeat([[0.3, -1.0]], 2, axis=0), rtol=1e-6)
