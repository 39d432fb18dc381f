"""The participation-gap split and metrics (flowerbed.common.participation), on hand-made data
and mock replies: disjointness, proportions, seeding, the gap formulas, the wrapper's sampling
and reply validation."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from flowerbed.common import config as C
from flowerbed.common import participation as P
from flowerbed.common.testing import FakeGrid, mock_reply


# ----------------------------------------------------------------------------- the split
def test_unparticipating_proportion_and_seed():
    ids = P.unparticipating_partitions(50, 0.2, seed=1)
    assert len(ids) == 10 and ids == sorted(set(ids)) and all(0 <= i < 50 for i in ids)
    assert P.unparticipating_partitions(50, 0.2, seed=1) == ids  # same seed, same clients
    assert P.unparticipating_partitions(50, 0.2, seed=2) != ids  # other seed, other clients
    assert P.unparticipating_partitions(10, 0.2, seed=1).__len__() == 2
    assert P.unparticipating_partitions(10, 0.0, seed=1) == []  # off
    assert len(P.unparticipating_partitions(3, 0.1, seed=1)) == 1  # at least one when on
    assert len(P.unparticipating_partitions(2, 0.9, seed=1)) == 1  # at least one trains
    with pytest.raises(ValueError, match="unparticipating-fraction=1.0"):
        P.unparticipating_partitions(10, 1.0, seed=1)


def test_train_val_split_disjoint_proportion_seeded():
    idx = np.arange(100, 200)
    tr, va = P.split_train_val(idx, 0.2, seed=3, partition_id=4)
    assert len(va) == 20 and len(tr) == 80
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(idx)
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)  # original order kept
    tr2, va2 = P.split_train_val(idx, 0.2, seed=3, partition_id=4)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert not np.array_equal(va, P.split_train_val(idx, 0.2, seed=4, partition_id=4)[1])
    assert not np.array_equal(va, P.split_train_val(idx, 0.2, seed=3, partition_id=5)[1])
    tr1, va1 = P.split_train_val(np.array([7]), 0.5, seed=0, partition_id=0)
    assert list(tr1) == [7] and len(va1) == 0  # a single example stays in train


def test_three_way_split_of_a_partitioning_is_disjoint_and_complete():
    parts = np.array_split(np.random.default_rng(0).permutation(1000), 10)
    cfg = {"unparticipating-fraction": 0.2, "val-fraction": 0.25, "seed": 9}
    unpart = P.unparticipating_partitions(10, 0.2, 9)
    seen, sizes = [], {"train": 0, "val": 0, "unpart": 0}
    for pid, idx in enumerate(parts):
        pieces = {p: P.split_of(cfg, idx, pid, 10, p) for p in ("train", "val", "unpart")}
        if pid in unpart:
            assert len(pieces["train"]) == len(pieces["val"]) == 0
            assert np.array_equal(pieces["unpart"], idx)
        else:
            assert len(pieces["unpart"]) == 0
            assert len(pieces["val"]) == round(0.25 * len(idx))
        for p, a in pieces.items():
            sizes[p] += len(a)
            seen.extend(a.tolist())
    assert sorted(seen) == list(range(1000))  # disjoint and complete
    assert sizes["unpart"] == 200 and sizes["val"] == 200 and sizes["train"] == 600
    off = {"unparticipating-fraction": 0.0, "val-fraction": 0.25, "seed": 9}
    assert np.array_equal(P.split_of(off, parts[0], 0, 10, "train"), parts[0])  # off: unchanged


def test_fragment_validates_in_one_line():
    schema = C.compose(C.RESULTS, C.PARTICIPATION)
    assert C.parse({}, schema)["unparticipating-fraction"] == 0.0  # off by default
    assert C.parse({}, schema)["val-fraction"] == 0.2
    for key, bad in (("unparticipating-fraction", 1.0), ("val-fraction", -0.1)):
        with pytest.raises(C.ConfigError, match=f"run config {key}={bad}"):
            C.parse({key: bad}, schema)


def test_check_may_train_names_the_partition():
    cfg = {"unparticipating-fraction": 0.2, "val-fraction": 0.2, "seed": 0}
    bad = P.unparticipating_partitions(10, 0.2, 0)[0]
    with pytest.raises(P.ParticipationError, match=f"partition {bad} is unparticipating"):
        P.check_may_train(cfg, bad, 10)
    good = next(i for i in range(10) if i not in P.unparticipating_partitions(10, 0.2, 0))
    P.check_may_train(cfg, good, 10)
    P.check_may_train({**cfg, "unparticipating-fraction": 0.0}, bad, 10)


# ----------------------------------------------------------------------------- the metrics
def test_gap_summary_by_hand():
    rows = [
        {"participating": 1, "part-train-accuracy": 0.9, "part-val-accuracy": 0.8},
        {"participating": 1, "part-train-accuracy": 0.7, "part-val-accuracy": 0.4},
        {"participating": 0, "unpart-accuracy": 0.5},
        {"participating": 0, "unpart-accuracy": 0.1},
    ]
    s = P.gap_summary(rows, metrics=("accuracy",))
    assert s["num_part_clients"] == 2 and s["num_unpart_clients"] == 2
    assert s["part_train_accuracy_mean"] == pytest.approx(0.8)
    assert s["part_val_accuracy_mean"] == pytest.approx(0.6)
    assert s["unpart_accuracy_mean"] == pytest.approx(0.3)
    assert s["out_of_sample_gap_accuracy"] == pytest.approx(0.8 - 0.6)  # train - val
    assert s["participation_gap_accuracy"] == pytest.approx(0.6 - 0.3)  # val - unpart
    # percentiles over clients (numpy's linear interpolation): p10 of [0.1, 0.5] = 0.14
    assert s["unpart_accuracy_p10"] == pytest.approx(0.14)
    assert s["unpart_accuracy_p50"] == pytest.approx(0.3)
    assert s["unpart_accuracy_p90"] == pytest.approx(0.46)
    # per-client out-of-sample gaps 0.1 and 0.3
    assert s["out_of_sample_gap_accuracy_p10"] == pytest.approx(0.12)
    assert s["out_of_sample_gap_accuracy_p90"] == pytest.approx(0.28)


def test_evaluate_splits_by_role():
    cfg = {"unparticipating-fraction": 0.5, "val-fraction": 0.2, "seed": 0}
    unpart = P.unparticipating_partitions(4, 0.5, 0)
    asked = []

    def score(part):
        asked.append(part)
        return {"accuracy": {"train": 0.9, "val": 0.7, "unpart": 0.5}[part], "num-examples": 10}

    out = P.evaluate_splits(cfg, unpart[0], 4, score)
    assert asked == ["unpart"] and out["participating"] == 0 and out["unpart-accuracy"] == 0.5
    part = next(i for i in range(4) if i not in unpart)
    asked.clear()
    out = P.evaluate_splits(cfg, part, 4, score)
    assert asked == ["train", "val"] and out["participating"] == 1
    assert out["part-train-accuracy"] == 0.9 and out["part-val-accuracy"] == 0.7
    assert out["num-examples"] == 20


# ----------------------------------------------------------------------------- the wrapper
class QueryGrid(FakeGrid):
    """FakeGrid whose nodes answer the partition query (node id = partition id + 1)."""

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            n = m.metadata.dst_node_id
            metrics = MetricRecord({"partition-id": n - 1, "num-partitions": len(self.node_ids)})
            out.append(
                mock_reply(RecordDict({"metrics": metrics}), n, message_type=MessageType.QUERY)
            )
        return out


def _arrays():
    return ArrayRecord({"w": Array(np.zeros(2))})


@pytest.mark.parametrize("fraction_train", [1.0, 0.5])
def test_wrapper_trains_only_participating_nodes(fraction_train):
    from flowerbed.strategies.fedavg import FedAvg

    grid = QueryGrid(list(range(1, 11)))
    inner = FedAvg(fraction_train=fraction_train, min_train_nodes=1, sample_seed=5)
    strat = P.Participation(inner, 0.2, seed=7, num_rounds=3)
    unpart_nodes = {p + 1 for p in P.unparticipating_partitions(10, 0.2, 7)}
    for rnd in (1, 2, 3):
        msgs = list(strat.configure_train(rnd, _arrays(), ConfigRecord(), grid))
        dst = {m.metadata.dst_node_id for m in msgs}
        assert dst and not dst & unpart_nodes
        assert len(dst) == (8 if fraction_train == 1.0 else 4)  # of the 8 participating
    assert strat.trained_nodes.isdisjoint(unpart_nodes)
    ev = list(strat.configure_evaluate(1, _arrays(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in ev) == list(range(1, 11))  # every node
    assert all(m.content["config"][P.GAP_EVAL] for m in ev)


def test_wrapper_rejects_bad_gap_replies_with_reasons():
    from flowerbed.strategies.fedavg import FedAvg

    grid = QueryGrid(list(range(1, 5)))
    strat = P.Participation(FedAvg(), 0.5, seed=0)
    list(strat.configure_train(1, _arrays(), ConfigRecord(), grid))
    unpart = {p + 1 for p in P.unparticipating_partitions(4, 0.5, 0)}
    part = sorted(set(range(1, 5)) - unpart)

    def rep(node, **m):
        return mock_reply(RecordDict({"metrics": MetricRecord(m)}), node, MessageType.EVALUATE)

    u = sorted(unpart)
    replies = [
        rep(part[0], participating=1, **{"part-train-accuracy": 0.9, "part-val-accuracy": 0.8}),
        rep(part[1], participating=1, **{"part-train-accuracy": 0.9}),  # no validation metric
        rep(u[0], participating=1, **{"part-train-accuracy": 1.0, "part-val-accuracy": 1.0}),
        rep(u[1], participating=0, **{"unpart-accuracy": float("nan")}),
        mock_reply(None, part[1], MessageType.EVALUATE, error="boom"),
    ]
    out = strat.aggregate_evaluate(1, replies)
    row = strat.history[1]
    assert row["num_gap_replies"] == 1 and len(row["gap_rejected"]) == 4
    text = " ".join(row["gap_rejected"])
    assert "part-val-accuracy=None is missing" in text
    assert "participating=1, the server expects 0" in text
    assert "unpart-accuracy=nan" in text and "error reply: boom" in text
    assert out["part_val_accuracy_mean"] == pytest.approx(0.8)
    assert "unpart_accuracy_mean" not in out  # no valid unparticipating reply


def test_with_participation_off_by_default():
    from flowerbed.strategies.fedavg import FedAvg

    inner = FedAvg()
    assert P.with_participation(inner, {"unparticipating-fraction": 0.0}) is inner
    assert P.with_participation(inner, {}) is inner
    wrapped = P.with_participation(inner, {"unparticipating-fraction": 0.2, "seed": 1})
    assert isinstance(wrapped, P.Participation) and wrapped.strategy is inner


def test_wrapper_state_roundtrip_keeps_gap_rows_and_inner_state():
    from flowerbed.strategies.fedavg import FedAvg

    inner = FedAvg()
    inner.history[1] = {"num_failures": 0}
    strat = P.Participation(inner, 0.2, seed=0)
    strat._history[1] = {"num_gap_replies": 5}
    assert strat.history == {1: {"num_failures": 0, "num_gap_replies": 5}}
    state = strat.state_dict()
    fresh = P.Participation(FedAvg(), 0.2, seed=0)
    fresh.load_state_dict(state)
    assert fresh.history == strat.history and fresh.strategy.history == {1: {"num_failures": 0}}


# ----------------------------------------------------------------------------- per-client rows
def test_evaluate_splits_sends_split_sizes_and_label_counts():
    cfg = {"unparticipating-fraction": 0.5, "val-fraction": 0.2, "seed": 0}
    unpart = P.unparticipating_partitions(4, 0.5, 0)
    part = next(i for i in range(4) if i not in unpart)
    n = {"train": 8, "val": 2, "unpart": 10}
    hist = {"train": [5, 3, 0], "val": [1, 1, 0], "unpart": [0, 0, 10]}

    def score(p):
        return {"accuracy": 0.5, "num-examples": n[p]}

    out = P.evaluate_splits(cfg, part, 4, score, label_counts=lambda p: hist[p])
    assert out["part-train-num-examples"] == 8 and out["part-val-num-examples"] == 2
    assert out["part-train-label-counts"] == [5, 3, 0] and out["part-val-label-counts"] == [1, 1, 0]
    assert out["num-examples"] == 10 and "unpart-label-counts" not in out
    out = P.evaluate_splits(cfg, unpart[0], 4, score, label_counts=lambda p: hist[p])
    assert out["unpart-num-examples"] == 10 and out["unpart-label-counts"] == [0, 0, 10]
    assert "part-val-num-examples" not in P.evaluate_splits(cfg, unpart[0], 4, score)


def test_weighted_means_and_gaps_by_hand():
    rows = [
        {"participating": 1, "part-train-accuracy": 1.0, "part-val-accuracy": 0.9,
         "part-train-num-examples": 30, "part-val-num-examples": 10},
        {"participating": 1, "part-train-accuracy": 0.5, "part-val-accuracy": 0.3,
         "part-train-num-examples": 10, "part-val-num-examples": 30},
        {"participating": 0, "unpart-accuracy": 0.8, "unpart-num-examples": 10},
        {"participating": 0, "unpart-accuracy": 0.2, "unpart-num-examples": 40},
    ]  # fmt: skip
    s = P.gap_summary(rows, metrics=("accuracy",))
    assert s["part_val_accuracy_mean"] == pytest.approx(0.6)  # unweighted: (0.9 + 0.3) / 2
    assert s["part_val_accuracy_wmean"] == pytest.approx((9 + 9) / 40)  # 0.45
    assert s["part_train_accuracy_wmean"] == pytest.approx((30 + 5) / 40)  # 0.875
    assert s["unpart_accuracy_wmean"] == pytest.approx((8 + 8) / 50)  # 0.32
    assert s["participation_gap_accuracy"] == pytest.approx(0.6 - 0.5)
    assert s["participation_gap_accuracy_weighted"] == pytest.approx(0.45 - 0.32)
    assert s["out_of_sample_gap_accuracy_weighted"] == pytest.approx(0.875 - 0.45)
    del rows[3]["unpart-num-examples"]  # one reply without sizes: no weighted unpart mean
    s = P.gap_summary(rows, metrics=("accuracy",))
    assert "unpart_accuracy_wmean" not in s and "participation_gap_accuracy_weighted" not in s


def test_client_row_and_label_entropy_by_hand():
    assert P.label_entropy([5, 0, 0]) == 0.0
    assert P.label_entropy([2, 2, 0, 0]) == pytest.approx(1.0)
    assert P.label_entropy([1, 1, 1, 1]) == pytest.approx(2.0)
    assert P.label_entropy([3, 1]) == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))
    reply = {"participating": 1, "part-train-accuracy": 0.9, "part-train-num-examples": 4,
             "part-train-label-counts": [2, 2], "part-val-accuracy": 0.5,
             "part-val-num-examples": 1, "part-val-label-counts": [1, 0], "num-examples": 5}  # fmt: skip
    row = P.client_row(reply, 7)
    assert row["partition_id"] == 7 and row["participating"] == 1
    assert row["part_train_accuracy"] == 0.9 and row["part_val_num_examples"] == 1
    assert row["part_train_label_entropy"] == pytest.approx(1.0)
    assert row["part_val_label_entropy"] == 0.0 and row["part_val_label_counts"] == [1, 0]
    assert not any(k.startswith("unpart") for k in row)


def test_wrapper_writes_per_client_rows_and_rejects_bad_sizes():
    from flowerbed.strategies.fedavg import FedAvg

    grid = QueryGrid(list(range(1, 5)))
    strat = P.Participation(FedAvg(), 0.5, seed=0)
    list(strat.configure_train(1, _arrays(), ConfigRecord(), grid))
    unpart = sorted(p + 1 for p in P.unparticipating_partitions(4, 0.5, 0))
    part = sorted(set(range(1, 5)) - set(unpart))

    def rep(node, **m):
        return mock_reply(RecordDict({"metrics": MetricRecord(m)}), node, MessageType.EVALUATE)

    good = {"part-train-accuracy": 0.9, "part-val-accuracy": 0.8, "part-train-num-examples": 4,
            "part-val-num-examples": 2, "part-val-label-counts": [1, 1]}  # fmt: skip
    replies = [
        rep(part[0], participating=1, **good),
        rep(part[1], participating=1, **{**good, "part-val-label-counts": [1, 2]}),  # sum 3 != 2
        rep(unpart[0], participating=0, **{"unpart-accuracy": 0.4, "unpart-num-examples": 0}),
        rep(unpart[1], participating=0, **{"unpart-accuracy": 0.6, "unpart-num-examples": 5}),
    ]
    out = strat.aggregate_evaluate(1, replies)
    row = strat.history[1]
    text = " ".join(row["gap_rejected"])
    assert "part-val-label-counts sum to 3, not part-val-num-examples=2" in text
    assert "unpart-num-examples=0 is not a positive int" in text
    clients = row["gap_clients"]
    assert [c["partition_id"] for c in clients] == sorted([part[0] - 1, unpart[1] - 1])
    by_pid = {c["partition_id"]: c for c in clients}
    assert by_pid[part[0] - 1]["part_val_label_counts"] == [1, 1]
    assert by_pid[part[0] - 1]["part_val_label_entropy"] == pytest.approx(1.0)
    assert by_pid[unpart[1] - 1] == {
        "partition_id": unpart[1] - 1, "participating": 0, "unpart_accuracy": 0.6,
        "unpart_num_examples": 5,
    }  # fmt: skip
    assert out["participation_gap_accuracy"] == pytest.approx(0.8 - 0.6)
    assert out["participation_gap_accuracy_weighted"] == pytest.approx(0.8 - 0.6)


def test_evaluate_counts_correct_examples_per_class():
    import torch

    from flowerbed.common.train import evaluate

    class Fixed(torch.nn.Module):  # predicts class 1 for every input
        def forward(self, x):
            return torch.tensor([[0.0, 1.0, 0.0]]).repeat(len(x), 1)

    x, y = torch.zeros(5, 2), torch.tensor([0, 1, 1, 2, 1])
    out = evaluate(Fixed(), x, y, device=torch.device("cpu"), num_classes=3)
    assert out["class-correct"] == [0, 3, 0] and out["accuracy"] == pytest.approx(0.6)
    assert "class-correct" not in evaluate(Fixed(), x, y, device=torch.device("cpu"))
    cfg = {"unparticipating-fraction": 0.5, "val-fraction": 0.2, "seed": 0}
    unpart = P.unparticipating_partitions(4, 0.5, 0)[0]
    reply = P.evaluate_splits(cfg, unpart, 4, lambda p: {**out, "num-examples": 5})
    assert reply["unpart-class-correct"] == [0, 3, 0]  # lists pass through as ints


def test_class_correct_is_checked_against_counts_and_accuracy():
    from flowerbed.strategies.fedavg import FedAvg

    grid = QueryGrid(list(range(1, 5)))
    strat = P.Participation(FedAvg(), 0.5, seed=0)
    list(strat.configure_train(1, _arrays(), ConfigRecord(), grid))
    unpart = sorted(p + 1 for p in P.unparticipating_partitions(4, 0.5, 0))

    def rep(node, hits, acc=0.6):
        m = {"participating": 0, "unpart-accuracy": acc, "unpart-num-examples": 5,
             "unpart-label-counts": [1, 3, 1], "unpart-class-correct": hits}  # fmt: skip
        return mock_reply(RecordDict({"metrics": MetricRecord(m)}), node, MessageType.EVALUATE)

    strat.aggregate_evaluate(1, [rep(unpart[0], [0, 3, 0]), rep(unpart[1], [0, 4, 0])])
    assert "not within 0..label count" in " ".join(strat.history[1]["gap_rejected"])
    assert strat.history[1]["gap_clients"][0]["unpart_class_correct"] == [0, 3, 0]
    strat.aggregate_evaluate(2, [rep(unpart[0], [1, 3, 0]), rep(unpart[1], [0, 3])])
    text = " ".join(strat.history[2]["gap_rejected"])
    assert "class-correct sums to 4, not unpart-accuracy=0.6000" in text
    assert "unpart-class-correct does not match unpart-label-counts" in text


def test_gap_analysis_script_splits_label_mix_from_residual():
    """docs/participation_gap_clients.py on hand-made rows: two classes with accuracy 1.0 and
    0.5 for everyone (a label-based world): the gap is all label mix, the residual 0."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "participation_gap_clients.py"
    spec = importlib.util.spec_from_file_location("gap_clients", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def client(part, counts):
        hits = [counts[0], counts[1] // 2]
        split = "part_val" if part else "unpart"
        row = {"participating": int(part), f"{split}_label_counts": counts,
               f"{split}_class_correct": hits, f"{split}_num_examples": sum(counts),
               f"{split}_accuracy": sum(hits) / sum(counts),
               f"{split}_label_entropy": P.label_entropy(counts)}  # fmt: skip
        if part:
            row["part_train_label_counts"] = [4 * c for c in counts]
        return row

    rows = [client(1, [10, 10]), client(1, [20, 0]), client(0, [0, 20]), client(0, [10, 10])]
    r = mod.analyse(rows, draws=2000, rng=np.random.default_rng(0))
    # held-out accuracies 0.75, 1.0 | 0.5, 0.75: gap 0.875 - 0.625
    assert r["gap"] == pytest.approx(0.25) and r["label-mix"] == pytest.approx(0.25)
    assert r["residual"] == pytest.approx(0.0, abs=1e-12)
    assert r["corr"] == pytest.approx(1.0)  # trained shares 0.75 / 0.25, accuracy 1.0 / 0.5
    assert r["wgap"] == pytest.approx(35 / 40 - 25 / 40)
    # 6 equally likely held-out pairs, gaps +-0.25 (4 of 6) and 0 (2): p = 4/6
    assert r["perm p"] == pytest.approx(4 / 6, abs=0.03)
    rows[2]["unpart_class_correct"] = [0, 0]  # the held-out client does worse within class
    rows[2]["unpart_accuracy"] = 0.0
    r = mod.analyse(rows, draws=10, rng=np.random.default_rng(0))
    assert r["label-mix"] == pytest.approx(0.25) and r["residual"] == pytest.approx(0.25)


def test_gap_reproduce_script_finds_runs_and_plans_the_missing(tmp_path):
    """docs/participation_gap_reproduce.py: a run counts when its fixed settings match (the
    newest sweep folder wins), the rest of the plan is listed as sweep commands, and the
    interval is Student's t by hand."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "participation_gap_reproduce.py"
    spec = importlib.util.spec_from_file_location("gap_reproduce", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def write(folder, seed, gap, **over):
        cfg = {**mod.FIXED, "partitioner": "label-dirichlet", "alpha": 0.1, "seed": seed}
        cfg.update({"num-server-rounds": 15, **over})
        final = {"num_part_clients": 80, "num_unpart_clients": 20, "gap": gap}
        out = tmp_path / folder / str(seed) / "results.json"
        out.parent.mkdir(parents=True)
        out.write_text(json.dumps({"config": cfg, "extra": {"final": final}}))
        return out

    write("20260101-000000", 0, 0.1)
    newest = write("20260102-000000", 0, 0.2)
    write("20260102-000000", 1, 0.3, lr=0.05)  # other settings: not a run of the plan
    five = write("20260102-000000", 2, 0.3, **{"num-server-rounds": 5})  # its own key
    found = mod.existing(tmp_path)
    assert found == {
        ("label-dirichlet", 0.1, 100, 15, 0): newest,
        ("label-dirichlet", 0.1, 100, 5, 2): five,
    }
    todo = {(n, a, c): s for n, a, c, _, s in mod.missing(found)}
    assert todo[("label-dirichlet", 0.1, 100)] == [1, 2]
    assert todo[("iid", None, 20)] == list(range(8))
    env, argv = mod.sweep_command("label-dirichlet", 0.1, 100, 15, [1, 2])
    assert env == {"CLIENTS": "100", "ROUNDS": "15", "SEEDS": "1,2", "ALPHAS": "0.1"}
    assert argv[-1] == "label-dir"
    m, sd, lo, hi = mod.mean_ci(np.array([0.1, 0.3]))
    half = 12.7062047 * np.sqrt(0.02) / np.sqrt(2)  # t(0.975, 1 dof) x sd / sqrt(n)
    assert (m, sd) == pytest.approx((0.2, np.sqrt(0.02)))
    assert (lo, hi) == pytest.approx((0.2 - half, 0.2 + half))
    # two seeds, gaps 0.03 and 0.01 with permutation sds 0.03 and 0.04: z = 0.04 / 0.05
    assert mod.pooled_z([{"gap": 0.03, "se": 0.03}, {"gap": 0.01, "se": 0.04}], "se") == (
        pytest.approx(0.8)
    )
    # part-val 0.6, 0.8, 1.0 (var 0.04 / 3), unpart 0.5, 0.7 (var 0.02 / 2)
    rows = [{"participating": 1, "part_val_accuracy": a} for a in (0.6, 0.8, 1.0)]
    rows += [{"participating": 0, "unpart_accuracy": a} for a in (0.5, 0.7)]
    assert mod.welch_se(rows) == pytest.approx(np.sqrt(0.04 / 3 + 0.02 / 2))
