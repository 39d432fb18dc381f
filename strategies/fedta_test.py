"""FedTA strategy with mock replies: BGPS, SIKF, reply checks, the continual schedule and its
final metrics (no Ray, no network)."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flowerbed.common.models import TinyViT, freeze, prompted_features
from flowerbed.common.records import wire_nbytes
from flowerbed.common.testing import FakeGrid, mock_reply
from flowerbed.strategies.fedta import (
    ContinualFedAvg,
    FedTA,
    ScheduleError,
    average_pools,
    bgps,
    mean_prototypes,
    sikf,
)

F32 = np.float32


def v(*xs):
    return np.array(xs, F32)


# ---------------------------------------------------------------- BGPS (Eqs. 9-10)
def test_bgps_selects_least_similar_prototype_and_freezes_below_threshold():
    # P_G = [a (class 0), b (class 0), c (class 1)]; cos(a,b)=0.6, cos(a,c)=0, cos(b,c)=0.8
    a, b, c = v(1, 0), v(0.6, 0.8), v(0, 1)
    # same-class entries are 1: row means a: (1+1+0)/3, b: (1+1+0.8)/3, c: (0+0.8+1)/3
    glob, frozen, scores = bgps([(0, b), (0, a), (1, c)], {}, set(), thr=0.65)
    np.testing.assert_allclose(glob[0], a)
    np.testing.assert_allclose(glob[1], c)
    assert scores[0] == pytest.approx(2 / 3) and scores[1] == pytest.approx(0.6)
    assert frozen == {1}  # 0.6 < 0.65 <= 2/3


def test_bgps_frozen_class_keeps_its_prototype_and_old_classes_give_context():
    glob, frozen, _ = bgps([(1, v(1, 1))], {1: v(0, 1), 0: v(1, 0)}, {1}, thr=0.9)
    np.testing.assert_allclose(glob[1], v(0, 1))  # frozen: the upload is ignored
    np.testing.assert_allclose(glob[0], v(1, 0))  # not uploaded: kept
    assert frozen == {1}
    # class 2 uploaded twice; the previous prototypes of classes 0 and 1 enter the matrix:
    # x=(1,0): row (1 [self] + 1 [class 2 twin] + cos(x,(1,0))=1 + cos(x,(0,1))=0)/4 = 0.75
    # y=(0,-1): row (1 + 1 + 0 + (-1))/4 = 0.25  -> y selected, frozen (0.25 < 0.3)
    glob, frozen, scores = bgps(
        [(2, v(1, 0)), (2, v(0, -1))], {0: v(1, 0), 1: v(0, 1)}, {1}, thr=0.3
    )
    np.testing.assert_allclose(glob[2], v(0, -1))
    assert scores[2] == pytest.approx(0.25) and frozen == {1, 2}


def test_bgps_no_freezing_when_not_allowed_and_mean_rule():
    _, frozen, _ = bgps([(0, v(1, 0)), (1, v(0, 1))], {}, set(), thr=0.9, allow_freeze=False)
    assert frozen == set()
    out = mean_prototypes([(0, v(1, 0)), (0, v(0, 1)), (3, v(2, 2))], {5: v(1, 1)})
    np.testing.assert_allclose(out[0], v(0.5, 0.5))
    np.testing.assert_allclose(out[3], v(2, 2))
    np.testing.assert_allclose(out[5], v(1, 1))


# ---------------------------------------------------------------- SIKF (Eq. 8)
def _tiny_backbone():
    torch.manual_seed(0)
    return freeze(TinyViT(patch=7, dim=8, depth=1, heads=2))


def _pool(seed, m=4, length=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, length, d, generator=g), torch.randn(m, d, generator=g)


def test_average_pools_is_weighted():
    p1 = (torch.zeros(2, 1, 3), torch.zeros(2, 3))
    p2 = (torch.ones(2, 1, 3), torch.full((2, 3), 4.0))
    prompts, keys = average_pools([p1, p2], [1, 3])
    torch.testing.assert_close(prompts, torch.full((2, 1, 3), 0.75))
    torch.testing.assert_close(keys, torch.full((2, 3), 3.0))


def test_sikf_distils_target_towards_the_other_pools():
    bb = _tiny_backbone()
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    pools = [_pool(1), _pool(2), _pool(3)]
    weights = [1.0, 1.0, 2.0]
    _, keys_avg = average_pools(pools, weights)

    def kd_loss(prompts, keys):
        e = bb.embed(x)
        q = bb.features(e)
        out = prompted_features(bb, e, q, prompts, keys, 2)[0]
        teach = [prompted_features(bb, e, q, p, k, 2)[0] for p, k in pools[1:]]
        return float(sum(torch.nn.functional.mse_loss(out, t) for t in teach) / 2)

    before = kd_loss(pools[0][0], keys_avg)
    prompts, keys, last = sikf(pools, weights, bb, x, top_n=2, steps=30, lr=0.05, target=0)
    torch.testing.assert_close(keys, keys_avg)  # keys: weighted average (Reconstruction)
    assert last == pytest.approx(kd_loss(prompts, keys), rel=0.5)
    assert kd_loss(prompts, keys) < 0.8 * before
    assert not torch.equal(prompts, pools[0][0])


def test_sikf_single_pool_or_zero_steps_returns_target():
    bb = _tiny_backbone()
    x = torch.rand(4, 1, 28, 28)
    p = _pool(5)
    prompts, keys, loss = sikf([p], [1.0], bb, x, top_n=2)
    torch.testing.assert_close(prompts, p[0])
    torch.testing.assert_close(keys, p[1])
    assert loss == 0.0


# ---------------------------------------------------------------- the strategy
def _pool_record(p, k):
    return ArrayRecord({"prompts": Array(p.numpy()), "keys": Array(k.numpy())})


def _reply(node, p, k, protos: dict, n=10):
    content = RecordDict(
        {
            "arrays": _pool_record(p, k),
            "protos": ArrayRecord({key: Array(np.asarray(a, F32)) for key, a in protos.items()}),
            "metrics": MetricRecord({"num-examples": n, "loss_stage1": 1.0}),
        }
    )
    return mock_reply(content, node_id=node)


def _strategy(**kw):
    bb = _tiny_backbone()
    s = FedTA(
        backbone=bb,
        x_surrogate=torch.rand(8, 1, 28, 28),
        num_classes=10,
        top_n=2,
        min_available_nodes=1,
        min_train_nodes=1,
        **kw,
    )
    g0 = _pool(0)
    msgs = list(
        s.configure_train(1, _pool_record(*g0), ConfigRecord({"task": 0}), FakeGrid([1, 2, 3]))
    )
    assert len(msgs) == 3
    assert "protos" in msgs[0].content.array_records
    assert msgs[0].content["config"]["frozen-classes"] == []
    return s


def test_strategy_aggregates_pools_and_prototypes_and_rejects_bad_replies():
    s = _strategy(use_sikf=True, sikf_steps=2, bgps_thr=0.5)
    p1, p2 = _pool(1), _pool(2)
    good = [
        _reply(1, *p1, {"p.0": np.eye(8)[0], "k.0": np.eye(8)[1], "p.1": np.eye(8)[2]}),
        _reply(2, *p2, {"p.0": 0.6 * np.eye(8)[3] + 0.8 * np.eye(8)[2], "p.2": np.eye(8)[4]}, n=30),
    ]
    nan = np.eye(8)[0].copy()
    nan[1] = np.nan
    bad = [
        _reply(3, *p1, {"p.0": nan}),
        _reply(4, *p1, {"p.12": np.eye(8)[0]}),  # class outside [0, 10)
        _reply(5, *p1, {"p.0": np.ones(5)}),  # wrong dim
        _reply(6, *p1, {"x.0": np.ones(8)}),
        _reply(7, _pool(1, m=3)[0], _pool(1, m=3)[1], {"p.0": np.ones(8)}),  # pool shape
        mock_reply(RecordDict({"arrays": _pool_record(*p1)}), node_id=8),  # no protos
    ]
    arrays, metrics = s.aggregate_train(1, good + bad)
    h = s.history[1]
    assert h["num_train_replies"] == 2 and h["num_rejected"] == 6
    _, keys = average_pools([p1, p2], [10, 30])
    np.testing.assert_allclose(arrays["keys"].numpy(), keys.numpy(), rtol=1e-6)
    assert arrays["prompts"].numpy().shape == (4, 2, 8)
    # class 0: e0 and u = 0.6 e3 + 0.8 e2; class 1: e2; class 2: e4. Row means (same class = 1):
    # e0 (1+1+0+0)/4 = 0.5, u (1+1+0.8+0)/4 = 0.7, e2 (0+0.8+1+0)/4 = 0.45, e4 1/4.
    # Class 0 -> e0 (0.5, not < 0.5: unfrozen); classes 1 and 2 frozen.
    assert sorted(s.global_protos) == [0, 1, 2] and s.frozen == {1, 2}
    np.testing.assert_allclose(s.global_protos[0], np.eye(8)[0])
    assert metrics["num_frozen"] == 2 and "sikf_loss" in metrics
    # next round sends the global prototypes and the frozen classes
    msgs = list(s.configure_train(2, arrays, ConfigRecord({"task": 1}), FakeGrid([1])))
    assert sorted(msgs[0].content["protos"].keys()) == ["g.0", "g.1", "g.2"]
    assert list(msgs[0].content["config"]["frozen-classes"]) == [1, 2]


def test_strategy_ablations_average_pools_and_mean_prototypes():
    s = _strategy(use_sikf=False, use_bgps=False)
    p1, p2 = _pool(1), _pool(2)
    arrays, _ = s.aggregate_train(
        1,
        [
            _reply(1, *p1, {"p.0": np.full(8, 1.0)}, n=10),
            _reply(2, *p2, {"p.0": np.full(8, 3.0)}, n=10),
        ],
    )
    prompts, keys = average_pools([p1, p2], [1, 1])
    np.testing.assert_allclose(arrays["prompts"].numpy(), prompts.numpy(), rtol=1e-6)
    np.testing.assert_allclose(s.global_protos[0], np.full(8, 2.0))
    assert s.frozen == set()


def test_strategy_keeps_state_when_all_replies_are_bad():
    s = _strategy()
    arrays, metrics = s.aggregate_train(1, [mock_reply(error="boom", node_id=1)])
    assert arrays is None and metrics is None and s.history[1]["num_failures"] == 1


# ---------------------------------------------------------------- the continual schedule
def _base_reply(node, value, n, classes, **metrics):
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(2, value, F32))}),
            "metrics": MetricRecord({"num-examples": n, **metrics}),
            "info": ConfigRecord({"classes": list(classes)}),
        }
    )
    return mock_reply(content, node_id=node)


def _eval_reply(node, pid, acc, first, cur, local=None):
    m = {"acc": acc, "acc_first": first, "acc_cur_global": cur, "num-examples": 10, "pid": pid}
    if local is not None:
        m["acc_cur_local"] = local
    return mock_reply(RecordDict({"metrics": MetricRecord(m)}), node_id=node)


def test_schedule_tasks_rounds_freeze_and_evaluation_only_after_each_task():
    s = ContinualFedAvg(num_tasks=2, rounds_per_task=3, bgps_warmup=1, min_available_nodes=1)
    g = ArrayRecord({"w": Array(np.zeros(2, F32))})
    grid = FakeGrid([1, 2])
    want = {1: (0, 0, False), 2: (0, 1, True), 3: (0, 2, True), 4: (1, 0, False), 6: (1, 2, True)}
    for rnd, (task, rit, may) in want.items():
        conf = list(s.configure_train(rnd, g, ConfigRecord(), grid))[0].content["config"]
        assert (conf["task"], conf["round-in-task"], conf["bgps-freeze"]) == (task, rit, may)
        assert s.may_freeze(rnd) is may
        evals = list(s.configure_evaluate(rnd, g, ConfigRecord(), grid))
        assert len(evals) == (2 if rit == 2 else 0)  # last round of the task only
    # seen classes: those of the valid training replies so far
    s.configure_train(1, g, ConfigRecord(), grid)
    s.aggregate_train(1, [_base_reply(1, 1.0, 10, [3, 4]), _base_reply(2, 3.0, 30, [4, 7])])
    conf = list(s.configure_evaluate(3, g, ConfigRecord(), grid))[0].content["config"]
    assert list(conf["seen-classes"]) == [3, 4, 7] and conf["task"] == 0
    with pytest.raises(ScheduleError, match="rounds_per_task=0"):
        ContinualFedAvg(num_tasks=2, rounds_per_task=0)


def test_schedule_final_metrics_hand_computed():
    s = ContinualFedAvg(num_tasks=2, rounds_per_task=1, min_available_nodes=1)
    g = ArrayRecord({"w": Array(np.zeros(2, F32))})
    for rnd in (1, 2):
        list(s.configure_train(rnd, g, ConfigRecord(), FakeGrid([1, 2])))
        arrays, metrics = s.aggregate_train(
            rnd, [_base_reply(1, 1.0, 10, [0]), _base_reply(2, 3.0, 30, [1])]
        )
        np.testing.assert_allclose(arrays["w"].numpy(), (10 * 1.0 + 30 * 3.0) / 40)
    # task 0: client pids 5, 6 (node ids differ from pids)
    m = s.aggregate_evaluate(
        1, [_eval_reply(1, 5, 0.8, 0.8, 0.8), _eval_reply(2, 6, 0.4, 0.5, 0.4)]
    )
    assert m["acc"] == pytest.approx(0.6) and s.history[1]["eval_task"] == 0
    s.aggregate_evaluate(
        2,
        [_eval_reply(1, 5, 0.5, 0.4, 0.6, local=0.8), _eval_reply(2, 6, 0.3, 0.5, 0.2, local=0.4)],
    )
    final = s.final_metrics()
    assert final["acc_t1"] == pytest.approx(0.6) and final["acc_t2"] == pytest.approx(0.4)
    assert final["accuracy"] == final["acc_t2"]
    assert final["kr_t"] == pytest.approx((0.4 / 0.8 + 0.5 / 0.5) / 2)  # Eq. 11, pid-matched
    assert final["kr_s"] == pytest.approx((0.6 / 0.8 + 0.2 / 0.4) / 2)  # Eq. 12
    sizes = [
        wire_nbytes(_base_reply(n, v, k, [c]).content)
        for n, v, k, c in ((1, 1.0, 10, 0), (2, 3.0, 30, 1))
    ]
    assert final["upload_bytes_per_client_round"] == pytest.approx(np.mean(sizes))
    assert final["upload_values_per_client_round"] == 2
    assert "pid" not in s.history[2]["per_client"]["5"]


def test_fedta_freezes_only_from_bgps_warmup():
    # two orthogonal prototypes: row means (1 + 0) / 2 = 0.5 < thr = 0.9, frozen if allowed
    protos = {"p.0": np.eye(8)[0], "p.1": np.eye(8)[1]}
    for warmup, frozen in ((1, set()), (0, {0, 1})):
        s = _strategy(bgps_thr=0.9, rounds_per_task=2, bgps_warmup=warmup, sikf_steps=0)
        s.aggregate_train(1, [_reply(1, *_pool(1), protos)])
        assert s.frozen == frozen
        s.aggregate_train(2, [_reply(1, *_pool(1), protos)])  # round-in-task 1: after warm-up
        assert s.frozen == {0, 1}
    # above the threshold nothing is frozen, even after the warm-up (0.5 is not < 0.5)
    s = _strategy(bgps_thr=0.5, rounds_per_task=1, sikf_steps=0)
    s.aggregate_train(1, [_reply(1, *_pool(1), protos)])
    assert s.frozen == set() and sorted(s.global_protos) == [0, 1]


def test_sikf_loss_is_the_mean_mse_over_the_other_pools_hand_computed():
    # one step: the returned loss is Eq. 8 at the start, 1/(n-1) sum_{j != i} MSE(V(E'_i), V(E'_j))
    # with the drawn pool's prompts and the averaged keys; target 1, so pool 1 is no teacher
    bb = _tiny_backbone()
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    pools = [_pool(1), _pool(2), _pool(3)]
    _, keys_avg = average_pools(pools, [1.0, 2.0, 1.0])
    e = bb.embed(x)
    q = bb.features(e)
    student = prompted_features(bb, e, q, pools[1][0], keys_avg, 2)[0]
    teachers = [prompted_features(bb, e, q, p, k, 2)[0] for p, k in (pools[0], pools[2])]
    mse = [float(((student - t) ** 2).mean()) for t in teachers]
    prompts, keys, loss = sikf(pools, [1.0, 2.0, 1.0], bb, x, top_n=2, steps=1, lr=0.01, target=1)
    assert loss == pytest.approx((mse[0] + mse[1]) / 2, rel=1e-5)
    torch.testing.assert_close(keys, keys_avg)
    # the drawn pool moved (one Adam step of lr 0.01 moves every used entry by about 0.01)
    assert 0.005 < float((prompts - pools[1][0]).abs().max()) < 0.02


def test_strategy_draws_the_sikf_target_at_random_per_round():
    s = _strategy(use_sikf=True, sikf_steps=1, bgps_thr=-1.0)
    pools = [_pool(1), _pool(2), _pool(3)]
    targets = []
    for rnd in range(1, 9):
        replies = [_reply(n + 1, *p, {"p.0": np.eye(8)[n]}) for n, p in enumerate(pools)]
        arrays, _ = s.aggregate_train(rnd, replies)
        t = s.history[rnd]["sikf_target_node"] - 1  # node n + 1 sent pool n
        targets.append(t)
        # the distilled pool is the drawn one (the order of the teachers does not matter)
        want, _, _ = sikf(pools, [10.0] * 3, s.backbone, s.x_surrogate, 2, 1, 1e-3, t)
        np.testing.assert_allclose(arrays["prompts"].numpy(), want.numpy(), rtol=1e-6)
    assert len(set(targets)) == 3  # every pool is drawn in 8 rounds (seeded)


def test_bgps_start_round_no_freezing_before_it_freezing_from_it():
    # two orthogonal prototypes: row means 0.5 < thr = 0.9; one round per task, no task warm-up
    s = _strategy(bgps_thr=0.9, num_tasks=5, rounds_per_task=1, bgps_warmup=0, bgps_start_round=3)
    grid = FakeGrid([1])
    g = _pool_record(*_pool(0))
    for rnd, frozen in ((1, set()), (2, set()), (3, {0, 1, 2})):
        conf = list(s.configure_train(rnd, g, ConfigRecord(), grid))[0].content["config"]
        assert conf["bgps-freeze"] is (rnd >= 3)
        protos = {"p.0": np.eye(8)[0], "p.1": np.eye(8)[1], "p.2": np.eye(8)[2]}
        s.aggregate_train(rnd, [_reply(1, *_pool(1), protos)])
        assert s.frozen == frozen and s.history[rnd]["num_frozen"] == len(frozen)
    # the task warm-up still applies from the start round on (round-in-task >= bgps_warmup)
    s = ContinualFedAvg(num_tasks=3, rounds_per_task=2, bgps_warmup=1, bgps_start_round=3)
    assert [s.may_freeze(r) for r in range(1, 7)] == [False, False, False, True, False, True]
    with pytest.raises(ScheduleError, match="bgps_start_round=0"):
        ContinualFedAvg(num_tasks=2, rounds_per_task=1, bgps_start_round=0)
