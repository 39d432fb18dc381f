"""fed-retrieval unit tests: each loss against values computed by hand on 2-3 tiny vectors, the
timeline builder, the user split, the IID control and the global metrics."""

import math

import numpy as np
import pytest
import torch

from flowerbed.common.testing import app_path

app_path("fed-retrieval")

from fedretrieval import data as D  # noqa: E402
from fedretrieval import model as M  # noqa: E402

C2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
E2 = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
# S = C E^T = [[0.6, 1.0], [0.8, 0.0]]


def test_batch_softmax_by_hand():
    # row 0: -log(e^.6 / (e^.6 + e^1)) = log(1 + e^.4); row 1: target 1 of [.8, 0]: log(1 + e^.8)
    want = (math.log(1 + math.exp(0.4)) + math.log(1 + math.exp(0.8))) / 2
    assert M.batch_softmax(C2, E2).item() == pytest.approx(want, rel=1e-6)


def test_global_softmax_by_hand():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # items 1, 2, 3
    labels = torch.tensor([1, 3])  # 1-based ids
    # row 0: logits [1, 0, -1], target item 1; row 1: logits [0, 1, 0], target item 3
    l0 = -math.log(math.e / (math.e + 1 + math.exp(-1)))
    l1 = -math.log(1 / (1 + math.e + 1))
    assert M.global_softmax(C2, table, labels).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_hinge_on_positives_by_hand():
    # positives 0.6 and 0.0: (0.9 - 0.6)^2 = 0.09, (0.9 - 0)^2 = 0.81; mean 0.45
    assert M.hinge_positive(C2, E2).item() == pytest.approx(0.45, rel=1e-6)
    # a positive above the margin costs nothing (the clamp is at 0, not negative)
    assert M.hinge_positive(C2[:1], C2[:1]).item() == 0.0
    # negatives never enter: changing the off-diagonal similarity leaves the loss unchanged
    assert M.hinge_positive(C2, torch.tensor([[0.6, 0.8], [0.6, 0.0]])).item() == pytest.approx(
        0.45
    )


def test_spreadout_by_hand():
    # off-diagonal Frobenius norm: E E^T = [[1, .6], [.6, 1]] -> sqrt(2 * .36)
    assert M.spreadout(E2 @ E2.T).item() == pytest.approx(math.sqrt(0.72), rel=1e-6)
    # cross S = [[.6, 1], [.8, 0]] -> sqrt(1 + .64): the diagonal (the positives) is left out
    assert M.spreadout(C2 @ E2.T).item() == pytest.approx(math.sqrt(1.64), rel=1e-6)
    # C C^T = I: nothing off the diagonal (1e-6 = the clamp of the square root)
    assert M.spreadout(C2 @ C2.T).item() == pytest.approx(1e-6, abs=1e-9)
    # context + label + cross, every lambda 0.001
    want = 0.001 * (1e-6 + math.sqrt(0.72) + math.sqrt(1.64))
    assert M.spreadout_terms(C2, E2).item() == pytest.approx(want, rel=1e-6)


def test_spreadout_has_a_finite_gradient_on_a_batch_of_one():
    c = torch.tensor([[1.0, 0.0]], requires_grad=True)
    M.spreadout_terms(c, c).backward()
    assert torch.isfinite(c.grad).all()


def _fixed_model() -> M.DualEncoder:
    """Items 1..3 at [1, 0], [0, 1], [.6, .8]; identity context tower."""
    m = M.DualEncoder(3, dim=2)
    with torch.no_grad():
        m.item_embedding.weight.copy_(torch.tensor([[9.0, 9.0], [1, 0], [0, 1], [0.6, 0.8]]))
        m.context_dense.weight.copy_(torch.eye(2))
        m.context_dense.bias.zero_()
    return m


def test_composite_losses_through_the_model():
    m = _fixed_model()
    ctx = torch.tensor([[1, 0], [2, 0]])  # contexts: item 1 -> [1, 0], item 2 -> [0, 1]
    labels = torch.tensor([3, 1])  # E = [[.6, .8], [1, 0]]: the C2, E2 above
    c = m(ctx)
    assert torch.allclose(c, C2)
    sp = 0.001 * (1e-6 + math.sqrt(0.72) + math.sqrt(1.64))
    bs = (math.log(1 + math.exp(0.4)) + math.log(1 + math.exp(0.8))) / 2
    got = {k: M.loss_for(k, m)(c, labels).item() for k in M.LOSSES}
    assert got["hinge-spreadout"] == pytest.approx(0.45 + sp, rel=1e-6)
    assert got["batch-softmax"] == pytest.approx(bs, rel=1e-6)
    assert got["batch-softmax-spreadout"] == pytest.approx(bs + sp, rel=1e-6)
    # global: logits [1, 0, .6] (target item 3) and [0, 1, .8] (target item 1)
    l0 = -math.log(math.exp(0.6) / (math.e + 1 + math.exp(0.6)))
    l1 = -math.log(1 / (1 + math.e + math.exp(0.8)))
    assert got["global-softmax"] == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_temperature_divides_the_softmax_logits_by_hand():
    # S / 0.5 = [[1.2, 2.0], [1.6, 0]]: row 0 target 0 -> log(1 + e^.8); row 1 target 1 ->
    # log(1 + e^1.6). A dropped temperature gives the T = 1 value, a multiplied one S * 0.5.
    want = (math.log(1 + math.exp(0.8)) + math.log(1 + math.exp(1.6))) / 2
    assert M.batch_softmax(C2, E2, temperature=0.5).item() == pytest.approx(want, rel=1e-6)
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # logits / 0.5: row 0 [2, 0, -2] target item 1; row 1 [0, 2, 0] target item 3
    l0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    l1 = -math.log(1 / (1 + math.exp(2) + 1))
    got = M.global_softmax(C2, table, torch.tensor([1, 3]), temperature=0.5).item()
    assert got == pytest.approx((l0 + l1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        M.LossOptions(temperature=0.0)


def test_loss_options_through_the_model_by_hand():
    m = _fixed_model()
    c, labels = m(torch.tensor([[1, 0], [2, 0]])), torch.tensor([3, 1])  # C2, E2 as above
    opts = M.LossOptions(temperature=0.5, spreadout_lambda=0.01, table_spreadout_lambda=0.1)
    got = {k: M.loss_for(k, m, opts)(c, labels).item() for k in M.LOSSES}
    bs = (math.log(1 + math.exp(0.8)) + math.log(1 + math.exp(1.6))) / 2
    sp = 0.01 * (1e-6 + math.sqrt(0.72) + math.sqrt(1.64))
    # items [1, 0], [0, 1], [.6, .8]: T T^T off-diagonal 0, .6, .8 (twice) -> sqrt(2)
    table = 0.1 * math.sqrt(2.0)
    assert got["batch-softmax"] == pytest.approx(bs, rel=1e-6)
    assert got["batch-softmax-spreadout"] == pytest.approx(bs + sp, rel=1e-6)  # no table term
    assert got["hinge-spreadout"] == pytest.approx(0.45 + sp + table, rel=1e-6)  # no temperature
    l0 = -math.log(math.exp(1.2) / (math.exp(2) + 1 + math.exp(1.2)))
    l1 = -math.log(1 / (1 + math.exp(2) + math.exp(1.6)))
    assert got["global-softmax"] == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_table_spreadout_equals_the_full_matrix_form():
    m = _fixed_model()
    assert M.table_spreadout(m, 1.0).item() == pytest.approx(math.sqrt(2.0), rel=1e-6)
    torch.manual_seed(0)
    big = M.DualEncoder(50, dim=4)
    t = big.table()
    assert M.table_spreadout(big, 0.3).item() == pytest.approx(
        0.3 * M.spreadout(t @ t.T).item(), rel=1e-5
    )


def test_context_tower_masks_the_padding():
    m = _fixed_model()  # row 0 (padding) is [9, 9]: it must not enter the mean
    assert torch.allclose(m(torch.tensor([[1, 2, 0, 0]])), torch.tensor([[1.0, 1.0]]) / 2**0.5)


def test_ranks_and_recall_by_hand():
    m = _fixed_model()
    ctx = torch.tensor([[1, 0]] * 3)  # c = [1, 0]: scores item1 1, item2 0, item3 .6
    labels = torch.tensor([1, 3, 2])
    assert M.ranks(m, ctx, labels).tolist() == [1, 2, 3]
    got = M.retrieval_metrics(m, ctx, labels, ks=(1, 2))
    assert got == pytest.approx({"recall@1": 1 / 3, "recall@2": 2 / 3, "mean-rank": 2.0})
    # a collapsed model (every score equal) ranks every label last, not first
    with torch.no_grad():
        m.context_dense.weight.zero_()
    assert M.ranks(m, ctx, labels).tolist() == [3, 3, 3]


# ---------------------------------------------------------------------------- data
def _ratings() -> D.Ratings:
    # user 7: items 5, 3, 9, 4 at times 30, 10, 20, 20 -> timeline 3, 4, 9, 5 (tie by item id)
    # user 2: two items only (dropped: fewer than 3)
    user = np.array([7, 7, 7, 7, 2, 2])
    item = np.array([5, 3, 9, 4, 1, 2])
    time = np.array([30, 10, 20, 20, 1, 2])
    return D.Ratings(user, item, time, 9)


def test_timeline_builder():
    ex = D.timelines(_ratings(), max_context=2)
    assert ex.user.tolist() == [7, 7, 7]
    assert ex.label.tolist() == [4, 9, 5]
    # context = previous items (at most 2), left-aligned, padded with 0
    assert ex.context.tolist() == [[3, 0], [3, 4], [4, 9]]
    capped = D.timelines(_ratings(), max_context=2, max_examples=2)
    assert capped.label.tolist() == [4, 9]  # the first examples in time
    assert len(D.timelines(_ratings(), min_length=5)) == 0
    assert D.timelines(_ratings(), users=np.array([2]), min_length=2).label.tolist() == [2]


def test_user_split_is_seeded_and_disjoint():
    users = np.arange(1, 101)
    tr, va, te = D.split_users(users, seed=0)
    assert (len(tr), len(va), len(te)) == (80, 10, 10)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == users.tolist()
    again = D.split_users(users, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again, strict=True))
    assert not np.array_equal(D.split_users(users, seed=1)[2], te)


def test_iid_control_keeps_counts_and_examples():
    ex = D.Examples(np.arange(12).reshape(6, 2), np.arange(6) + 1, np.array([1, 1, 1, 1, 2, 2]))
    iid = D.shuffle_across_users(ex, seed=3)
    assert iid.user.tolist() == ex.user.tolist()  # each user keeps its number of examples
    assert sorted(iid.label.tolist()) == ex.label.tolist()
    assert not np.array_equal(iid.label, ex.label)
    # pairs move together
    assert {(tuple(c), int(y)) for c, y in zip(iid.context, iid.label, strict=True)} == {
        (tuple(c), int(y)) for c, y in zip(ex.context, ex.label, strict=True)
    }


def test_movielens_100k_from_the_recbole_wheel():
    r = D.load_ml100k()
    assert len(r.user) == 100_000 and len(np.unique(r.user)) == 943 and r.num_items == 1682
    s = D.load_split("ml-100k", seed=0)
    users = [set(x.user.tolist()) for x in (s.train, s.val, s.test)]
    assert [len(u) for u in users] == [754, 94, 95]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    counts = np.bincount(s.train.user)
    assert counts.max() == 300  # the cap
    assert s.train.context.shape[1] == 10 and s.train.label.min() >= 1
