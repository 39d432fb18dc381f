"""fed-retrieval app: config, the client step called directly, in-process runs asserting on
results.json (no Ray), one `flwr run` end to end, and a slow convergence check."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from flowerbed.common.config import ConfigError, check_pyproject
from flowerbed.common.testing import app_path, mock_reply, node_context

APP = app_path("fed-retrieval")

from fedretrieval import client_app, task  # noqa: E402
from fedretrieval import model as M  # noqa: E402
from fedretrieval.methods import METHODS  # noqa: E402

TINY = {"max-users": 40, "num-server-rounds": 2, "device": "cpu"}


def test_pyproject_defaults_are_the_schema_defaults():
    assert check_pyproject(APP, task.SCHEMA) == []


def test_method_table_has_every_loss_in_three_settings():
    assert len(METHODS) == 12
    for loss in ("batch-softmax", "global-softmax", "hinge-spreadout", "batch-softmax-spreadout"):
        assert {f"{loss}", f"{loss}-iid", f"{loss}-centralized"} <= set(METHODS)
        assert METHODS[f"{loss}-iid"].flag("iid") and not METHODS[loss].flag("iid")
        assert METHODS[f"{loss}-centralized"].flag("loss") == loss


def test_bad_key_or_value_is_one_line():
    with pytest.raises(ConfigError, match=r"^unknown run config key 'rounds'; valid keys: "):
        task.parse_config({"rounds": 1})
    with pytest.raises(ConfigError, match=r"method='fedmagic': must be one of hinge-spreadout"):
        task.parse_config({"method": "fedmagic"})
    with pytest.raises(ConfigError, match=r"source='ml-20m': must be one of ml-100k, ml-1m"):
        task.parse_config({"source": "ml-20m"})
    with pytest.raises(ConfigError, match=r"^run config temperature=0.0: softmax logits"):
        task.parse_config({"temperature": 0.0})


def test_loss_options_come_from_the_run_config():
    cfg = task.parse_config(
        {"temperature": 0.1, "spreadout-lambda": 0.002, "table-spreadout-lambda": 0.01}
    )
    assert task.loss_options(cfg) == M.LossOptions(0.1, 0.002, 0.01)
    assert task.loss_options(task.parse_config({})) == M.LossOptions()  # the authors' defaults


def _call(cfg_over: dict, pid: int, n: int, rnd: int = 1):
    cfg = task.parse_config({**TINY, **cfg_over})
    content = RecordDict(
        {"arrays": task.initial_arrays(cfg), "config": ConfigRecord({"server-round": rnd})}
    )
    ctx = node_context(pid, n)
    ctx.run_config.update({**TINY, **cfg_over})
    return client_app.train(mock_reply(content), ctx).content, cfg


def test_user_partitioner_gives_whole_users_round_robin():
    cfg = task.parse_config(TINY)
    train = task.split_of(cfg).train
    order = train.users()
    from flowerbed.common.partition import partition_indices

    parts = partition_indices(train.user, 3, "user", seed=cfg["seed"])
    for p, idx in enumerate(parts):
        assert sorted(set(train.user[idx].tolist())) == sorted(order[p::3].tolist())
    assert sum(len(i) for i in parts) == len(train)


def test_client_step_is_the_example_weighted_mean_of_its_users():
    """A node with two users replies what FedAvg over those two one-user clients would give."""
    cfg = task.parse_config(TINY)
    n_users = len(task.split_of(cfg).train.users())
    both, _ = _call({}, 0, n_users // 2)  # partition 0 holds users 0 and n_users // 2
    assert both["metrics"]["users"] == 2
    from fedretrieval import data as D

    train = task.split_of(cfg).train
    users = train.users()[[0, n_users // 2]]
    model = task.make_model(cfg)
    outs, ws = [], []
    init = task.initial_arrays(cfg)
    for u in users:
        ex = D.Examples(*(a[train.user == u] for a in (train.context, train.label, train.user)))
        seed = task.derive_seed(cfg["seed"], 0, 1, int(u))
        new, _ = task._sgd(cfg, model, init, ex, seed)
        outs.append(new)
        ws.append(len(ex))
    assert both["metrics"]["num-examples"] == sum(ws)
    for k in init:
        want = sum(
            w * o[k].numpy().astype(np.float64) for w, o in zip(ws, outs, strict=True)
        ) / sum(ws)
        np.testing.assert_allclose(both["arrays"][k].numpy(), want, rtol=1e-5, atol=1e-7)
        # not the unweighted mean (the users' counts differ)
        if ws[0] != ws[1] and not np.allclose(outs[0][k].numpy(), outs[1][k].numpy()):
            unweighted = (outs[0][k].numpy() + outs[1][k].numpy()) / 2
            assert not np.allclose(both["arrays"][k].numpy(), unweighted, rtol=1e-6, atol=1e-9)
    again, _ = _call({}, 0, n_users // 2)  # seeded by (seed, partition, round, user)
    assert all(np.array_equal(again["arrays"][k].numpy(), both["arrays"][k].numpy()) for k in init)
    later, _ = _call({}, 0, n_users // 2, rnd=2)
    assert any(
        not np.array_equal(later["arrays"][k].numpy(), both["arrays"][k].numpy()) for k in init
    )


def test_iid_control_trains_on_shuffled_examples():
    cfg = task.parse_config({**TINY, "method": "hinge-spreadout-iid"})
    fed = task.split_of(task.parse_config(TINY)).train
    iid = task.split_of(cfg).train
    assert np.array_equal(np.bincount(iid.user), np.bincount(fed.user))
    assert not np.array_equal(iid.label, fed.label)
    assert sorted(iid.label.tolist()) == sorted(fed.label.tolist())


def _run(tmp_path, method: str, **over):
    from flowerbed.simulation.local import run_local

    out = tmp_path / method
    run_local(
        "fed-retrieval",
        {**TINY, "method": method, "results-dir": str(out), **over},
        num_supernodes=4,
    )
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize(
    "method", ["global-softmax", "hinge-spreadout-iid", "global-softmax-centralized"]
)
def test_smoke_run_writes_results(tmp_path, method):
    rec = _run(tmp_path, method)
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    data = rec["extra"]["data"]
    assert data["num_items"] == 1682 and data["train_users"] == 32 and data["test_users"] == 4
    r0 = rounds[0]
    # untrained model: recall@10 near 10 / 1682, mean rank near the middle of 1682 items
    assert r0["server_recall@10"] < 0.05 and 500 < r0["server_mean-rank"] < 1200
    final = rec["extra"]["final"]
    assert set(final) >= {"recall@1", "recall@5", "recall@10", "mean-rank"}
    assert final["recall@1"] <= final["recall@5"] <= final["recall@10"]
    if METHODS[method].strategy.__name__ == "make_centralized":
        assert rec["extra"]["totals"]["bytes_sent"] == 0
    else:
        assert rounds[1]["phases"]["train"]["num_replies"] == 4
        # the model (1683 x 16 + 16 x 16 + 16 floats) to 4 nodes
        assert rounds[1]["bytes_sent"] > 4 * 4 * (1683 * 16 + 272)
        assert rounds[1]["train_users"] == 8  # 32 train users on 4 nodes
        # every reply of both rounds validated and averaged (round 2 starts from the Adam step)
        assert [rounds[r]["num_train_replies"] for r in (1, 2)] == [4, 4]
        assert rounds[2]["num_rejected"] == 0


def test_clients_per_round_is_fraction_train(tmp_path):
    rec = _run(tmp_path, "batch-softmax", **{"fraction-train": 0.5, "num-server-rounds": 1})
    r1 = next(r for r in rec["rounds"] if r["round"] == 1)
    assert r1["phases"]["train"]["num_replies"] == 2


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    p = flwr_run(
        "fed-retrieval",
        {**TINY, "num-server-rounds": 1, "method": "global-softmax", "results-dir": str(out)},
        num_supernodes=2,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in rec["rounds"]] == [0, 1]
    assert rec["rounds"][1]["phases"]["train"]["num_replies"] == 2


@pytest.mark.slow
def test_trained_model_beats_random_recall():
    """Two epochs of global softmax, centralized, on all of MovieLens-100K: recall@10 well
    above chance (10 / 1682 = 0.006) and a mean rank far below the middle."""
    cfg = task.parse_config({"method": "global-softmax-centralized", "device": "cpu"})
    fit, evaluate = task.central_fit(cfg), task.evaluator(cfg)
    arrays = task.initial_arrays(cfg)
    for r in (1, 2):
        arrays, _ = fit(r, arrays)
    got = evaluate(arrays)
    assert got["recall@10"] > 0.03 and got["mean-rank"] < 500


def test_trained_model_beats_random_recall_tiny():
    """Fast version: 40 users, global softmax, 3 epochs, recall@10 on the train users' own
    examples above chance (the held-out users are only 4 here)."""
    cfg = task.parse_config({**TINY, "method": "global-softmax-centralized", "lr": 0.5})
    fit = task.central_fit(cfg)
    arrays = task.initial_arrays(cfg)
    model = task.make_model(cfg)
    from fedretrieval.model import retrieval_metrics

    from flowerbed.common.records import load_record

    train = task.split_of(cfg).train
    x, y = torch.from_numpy(train.context), torch.from_numpy(train.label)
    before = retrieval_metrics(load_record(model, arrays), x, y)
    for r in (1, 2, 3):
        arrays, _ = fit(r, arrays)
    after = retrieval_metrics(load_record(model, arrays), x, y)
    assert before["recall@10"] < 0.02 and after["recall@10"] > 3 * 10 / 1682
    assert after["mean-rank"] < 0.6 * before["mean-rank"]
