"""FedBone app: config, split == unsplit gradients for one batch of every task, the client's
phases called directly (seeded, state kept), a malformed reply rejected by name, in-process runs
of every method asserting on results.json, and one `flwr run` end to end."""

import copy
import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flowerbed.common.config import ConfigError, check_pyproject
from flowerbed.common.testing import app_path, mock_reply, node_context

APP = app_path("fedbone")

from fedbone import client_app, task  # noqa: E402
from fedbone.methods import METHODS  # noqa: E402

TINY = {
    "num-server-rounds": 2,
    "steps": 4,
    "batch-size": 16,
    "eval-samples": 64,
    "client-lr": 3e-3,
    "server-lr": 3e-3,
}


def test_pyproject_defaults_are_the_schema_defaults():
    assert check_pyproject(APP, task.SCHEMA) == []


def test_bad_key_or_value_is_one_line():
    with pytest.raises(ConfigError, match=r"^unknown run config key 'rounds'; valid keys: "):
        task.parse_config({"rounds": 1})
    with pytest.raises(ConfigError, match=r"method='fedmagic': must be one of fedbone, split-"):
        task.parse_config({"method": "fedmagic"})
    with pytest.raises(ConfigError, match=r"^run config history-beta=1.0: history EMA factor"):
        task.parse_config({"history-beta": 1.0})


def test_tasks_are_derived_from_the_images():
    cfg = task.parse_config({"batch-size": 8})
    assert [task.task_of(p) for p in range(4)] == ["cls", "denoise", "seg", "cls"]
    x, y = task.train_batch(cfg, 0, 3, 1, 0)
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64
    xn, clean = task.train_batch(cfg, 1, 3, 1, 0)
    # denoising input = clean + noise of std noise-std
    assert (xn - clean).std().item() == pytest.approx(0.3, rel=0.15)
    xs, mask = task.train_batch(cfg, 2, 3, 1, 0)
    assert torch.equal(mask, (xs > 0.1).float()) and 0.2 < mask.mean() < 0.8
    # seeded by (seed, pid, round, step)
    assert torch.equal(task.train_batch(cfg, 1, 3, 1, 0)[0], xn)
    assert not torch.equal(task.train_batch(cfg, 1, 3, 1, 1)[0], xn)


def test_task_metrics_by_hand():
    out = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    assert task.task_metrics("cls", out, torch.tensor([0, 1, 1]))["cls_accuracy"] == pytest.approx(
        2 / 3
    )
    # sigmoid(0) = 0.5 against 0: MSE 0.25, PSNR = 10 log10(1/0.25) = 6.0206 dB
    m = task.task_metrics("denoise", torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert m["denoise_mse"] == pytest.approx(0.25) and m["denoise_psnr"] == pytest.approx(
        6.0206, abs=1e-4
    )
    # pred = (1, 1, 0, 0), mask = (1, 0, 1, 0): intersection 1, union 3
    pred = torch.tensor([1.0, 1.0, -1.0, -1.0])
    assert task.task_metrics("seg", pred, torch.tensor([1.0, 0.0, 1.0, 0.0]))[
        "seg_iou"
    ] == pytest.approx(1 / 3)


@pytest.mark.parametrize("pid", [0, 1, 2])
def test_split_gradients_equal_unsplit_for_one_batch(pid):
    """The split protocol's pieces (client embed, server G forward/backward, client head
    backward, client embed backward) give every parameter the gradient of the whole model."""
    cfg = task.parse_config({"batch-size": 8, "device": "cpu"})
    parts = task.make_parts(cfg, pid)
    with torch.no_grad():  # nonzero head weights everywhere
        for p in parts.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    whole_parts, whole_g = copy.deepcopy(parts), task.make_general(cfg)
    x, target = task.train_batch(cfg, pid, 3, 1, 0)
    # split
    server = task.TorchGeneral(cfg)
    with torch.no_grad():
        e = parts.embed(x)
    feats = server.forward(7, e.numpy())
    d_feats, loss = task.head_backward(parts, torch.from_numpy(feats), target)
    g_general, d_embed = server.backward(7, d_feats.numpy())
    parts.embed(x).backward(torch.from_numpy(d_embed))
    # unsplit
    ref = task.task_loss(whole_parts.task, whole_parts.top(whole_g(whole_parts.embed(x))), target)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), abs=1e-6)
    for (name, p), q in zip(parts.named_parameters(), whole_parts.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    flat = torch.cat([p.grad.reshape(-1) for p in whole_g.parameters()]).double().numpy()
    assert g_general.shape == flat.shape
    assert np.abs(g_general - flat).max() < 1e-6


def test_server_step_applies_the_aggregated_gradient():
    """TorchGeneral.step puts the flat gradient on G's parameters in order (Adam's first step
    moves each weight by -lr * sign(g))."""
    cfg = task.parse_config({"server-lr": 0.01, "device": "cpu"})
    server = task.TorchGeneral(cfg)
    before = [p.detach().clone() for p in server.params]
    n = sum(p.numel() for p in server.params)
    g = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    server.step(g)
    moved = torch.cat(
        [(p.detach() - b).reshape(-1) for p, b in zip(server.params, before, strict=True)]
    )
    np.testing.assert_allclose(moved.numpy(), -0.01 * g, atol=1e-6)


def _call(fn, pid, config, state, run_config=None, **records):
    content = RecordDict({"config": ConfigRecord(config), **records})
    ctx = node_context(pid, 3, {**TINY, **(run_config or {})}, state)
    return fn(mock_reply(content), ctx).content


def test_client_phases_keep_their_state_and_are_seeded():
    from flowerbed.strategies.fedbone import tensor_record

    state = RecordDict()
    cfg = {"server-round": 1, "step": 0}
    e1 = _call(client_app.embed, 1, cfg, state)["embed"]["t"].numpy()
    assert e1.shape == (16, 16, 7, 7) and "parts" not in state.array_records
    feats = np.random.default_rng(0).normal(size=(16, 32, 7, 7)).astype(np.float32)
    rep = _call(client_app.head, 1, cfg, state, features=tensor_record(t=feats))
    assert rep["grad"]["t"].shape == (16, 32, 7, 7) and rep["config"]["task"] == "denoise"
    assert np.isfinite(rep["metrics"]["loss"]) and rep["metrics"]["compute-s"] > 0
    head_w = state["parts"]["head.weight"].numpy().copy()
    embed_w = state["parts"]["embed.weight"].numpy().copy()
    d_e = np.ones((16, 16, 7, 7), np.float32)
    _call(client_app.back, 1, cfg, state, grad=tensor_record(t=d_e))
    # train.head stepped the head, train.back the embedding only
    assert np.array_equal(state["parts"]["head.weight"].numpy(), head_w)
    assert not np.array_equal(state["parts"]["embed.weight"].numpy(), embed_w)
    # the next embedding uses the updated patch embedding; a fresh node gives the first again
    e2 = _call(client_app.embed, 1, cfg, state)["embed"]["t"].numpy()
    assert not np.array_equal(e1, e2)
    assert np.array_equal(_call(client_app.embed, 1, cfg, RecordDict())["embed"]["t"].numpy(), e1)


def test_local_only_client_continues_from_its_own_general_model():
    cfg = task.parse_config(TINY)
    init = task.initial_arrays(cfg)
    local = {"method": "local"}
    state = RecordDict()
    r1 = _call(client_app.train, 0, {"server-round": 1}, state, local, arrays=init)["arrays"]
    r2 = _call(client_app.train, 0, {"server-round": 2}, state, local, arrays=init)["arrays"]
    # the same two calls under fedavg, the second one fed round 1's output: identical
    s2 = RecordDict()
    _call(client_app.train, 0, {"server-round": 1}, s2, {"method": "fedavg"}, arrays=init)
    ref = _call(client_app.train, 0, {"server-round": 2}, s2, {"method": "fedavg"}, arrays=r1)
    assert all(np.array_equal(r2[k].numpy(), ref["arrays"][k].numpy()) for k in r2)
    # under fedavg the received G is used: starting again from init gives another model
    other = _call(client_app.train, 0, {"server-round": 2}, s2, {"method": "fedavg"}, arrays=init)
    assert any(not np.array_equal(r2[k].numpy(), other["arrays"][k].numpy()) for k in r2)


def test_method_rows_set_the_gpaggregation_switches():
    cfg = task.parse_config(TINY)
    got = {
        name: (s.attention, s.projection)
        for name in ("fedbone", "split-pcgrad", "split-avg")
        for s in [METHODS[name].strategy(cfg, general=None)]
    }
    assert got == {
        "fedbone": (True, True),
        "split-pcgrad": (False, True),
        "split-avg": (False, False),
    }


def _run(tmp_path, name, num_supernodes=3, **over):
    from flowerbed.simulation.local import run_local

    out = tmp_path / name
    run_local("fedbone", {**TINY, **over, "results-dir": str(out)}, num_supernodes=num_supernodes)
    rec = json.loads((out / "results.json").read_text())
    return rec, {r["round"]: r for r in rec["rounds"]}


METRICS = ("client_cls_accuracy", "client_denoise_psnr", "client_seg_iou")


def test_fedbone_smoke_run_logs_conflicts_and_every_task_improves(tmp_path):
    rec, rounds = _run(tmp_path, "fedbone", **{"num-server-rounds": 3})
    assert sorted(rounds) == [0, 1, 2, 3]
    for r in (1, 2, 3):
        row = rounds[r]
        assert row["steps"] == 4 and row["num_rejected"] == 0
        assert len(row["conflict_rate_steps"]) == 4
        assert all(v in (0.0, 0.3333, 0.6667, 1.0) for v in row["conflict_rate_steps"])
        assert all(m in row for m in METRICS)
        ph = row["phases"]
        assert [ph[p]["num_replies"] for p in ("train.embed", "train.head", "train.back")] == [
            12,
            12,
            12,
        ]
        # per step, by hand: embeddings up 3 x 16x16x7x7, features down and their gradients up
        # 3 x 16x32x7x7, embedding gradients down 3 x 16x16x7x7, float32
        tensors = 3 * 4 * 16 * 49 * (16 + 32 + 32 + 16)
        assert tensors < row["bytes_per_step"] < tensors + 3 * 4 * 400
        assert row["client_compute_s_per_step"] > 0
        # projection diagnostics per step: pairs in node order, a conflict = a negative cosine
        assert row["pair_tasks"] == ["cls|denoise", "cls|seg", "denoise|seg"]
        assert row["grad_tasks"] == ["cls", "denoise", "seg"]
        assert [len(c) for c in row["cos_steps"]] == [3] * 4
        rates = [round(sum(c < 0 for c in cs) / 3, 4) for cs in row["cos_steps"]]
        assert rates == row["conflict_rate_steps"]
        assert len(row["pc_change_steps"]) == 4 and min(row["pc_change_steps"]) >= 0
        assert all(min(n) > 0 for n in row["grad_norm_steps"])
    # each task's metric improves on tiny data; the denoising/segmentation losses fall
    assert rounds[3]["client_denoise_psnr"] > rounds[1]["client_denoise_psnr"] + 0.3
    assert rounds[3]["client_seg_iou"] > rounds[1]["client_seg_iou"]
    # classification learns more slowly (pooled features): present here, its improvement is
    # checked by the slow test below
    assert 0.0 <= rounds[3]["client_cls_accuracy"] <= 1.0
    assert rounds[3]["loss_seg"] < rounds[1]["loss_seg"]
    final = rec["extra"]["final"]
    assert 0 <= final["conflict_rate"] <= 1 and final["bytes_sent"] > 0


@pytest.mark.slow
def test_every_task_learns_over_more_steps(tmp_path):
    _, rounds = _run(tmp_path, "long", **{"num-server-rounds": 4, "steps": 20, "batch-size": 32})
    assert rounds[4]["client_cls_accuracy"] > 0.3  # chance is 0.1
    assert rounds[4]["client_denoise_psnr"] > rounds[1]["client_denoise_psnr"] + 1.0
    assert rounds[4]["client_seg_iou"] > rounds[1]["client_seg_iou"]


@pytest.mark.parametrize("method", ["split-avg", "fedavg", "local"])
def test_baselines_run_and_report_bytes_and_compute(tmp_path, method):
    rec, rounds = _run(tmp_path, method, method=method, **{"num-server-rounds": 1})
    assert all(m in rounds[1] for m in METRICS)
    if METHODS[method].flag("split"):
        assert rounds[1]["client_compute_s_per_step"] > 0
    else:
        assert rounds[1]["phases"]["train"]["num_replies"] == 3
        assert rounds[1]["train_compute-s"] > 0
        assert rounds[1]["bytes_sent"] > 3 * 4 * 20_000  # G (~21k floats) to 3 clients


def test_projection_changes_the_general_model_when_gradients_conflict(tmp_path):
    """split-avg and split-pcgrad see the same first-step gradients; with conflicts the
    projected mean differs, so the rounds diverge; fedbone differs from split-pcgrad once
    there is a history (step 2 on)."""
    res = {m: _run(tmp_path, m, method=m, **{"num-server-rounds": 1})[1][1] for m in METHODS}
    avg, pc, fb = res["split-avg"], res["split-pcgrad"], res["fedbone"]
    assert avg["conflict_rate_steps"][0] == pc["conflict_rate_steps"][0]
    assert max(pc["conflict_rate_steps"]) > 0
    assert avg["client_denoise_psnr"] != pc["client_denoise_psnr"]
    assert fb["client_denoise_psnr"] != pc["client_denoise_psnr"]


def test_a_malformed_reply_is_rejected_by_name_and_g_stays_finite(tmp_path, monkeypatch):
    orig = task.client_head

    def bad(cfg, state, pid, n, rnd, step, feats):
        grad, loss, secs = orig(cfg, state, pid, n, rnd, step, feats)
        if pid == 1 and step == 0:
            grad = grad[:, :-1]  # wrong shape
        if pid == 1 and step == 1:
            grad = grad.copy()
            grad[0, 0, 0, 0] = np.nan
        return grad, loss, secs

    monkeypatch.setattr(task, "client_head", bad)
    rec, rounds = _run(tmp_path, "bad", **{"num-server-rounds": 1})
    reasons = rounds[1]["phases"]["train.head"]["failure_reasons"]
    assert reasons == [
        "node 2: rejected, grad has shape (16, 31, 7, 7), expected (16, 32, 7, 7)",
        "node 2: rejected, grad contains NaN/Inf",
    ]
    assert rounds[1]["num_rejected"] == 2 and rounds[1]["phases"]["train.back"]["num_sent"] == 10
    rec_arrays = task.initial_arrays(task.parse_config(TINY))
    assert isinstance(rec_arrays, ArrayRecord)
    assert np.isfinite(rounds[1]["client_denoise_psnr"])


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    p = flwr_run(
        "fedbone",
        {**TINY, "num-server-rounds": 1, "steps": 2, "results-dir": str(out)},
        num_supernodes=3,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1] and rounds[1]["steps"] == 2
    assert rounds[1]["phases"]["train.back"]["num_replies"] == 6  # 2 steps x 3 clients
    assert all(m in rounds[1] for m in METRICS) and len(rounds[1]["conflict_rate_steps"]) == 2


def test_client_sampling_trains_a_seeded_share_and_evaluates_every_client(tmp_path):
    """fraction-train 0.5 of 6 clients: the 3 partitions drawn from (seed, round) train in every
    step of the round (3 gradients of G, 3 pairs), all 6 are evaluated."""
    from flowerbed.common.seeding import sample_partitions

    _, rounds = _run(
        tmp_path,
        "sampled",
        num_supernodes=6,
        **{"fraction-train": 0.5, "num-server-rounds": 2, "steps": 2},
    )
    for r in (1, 2):
        row = rounds[r]
        assert row["num_sampled"] == 3
        assert row["sampled_partitions"] == sample_partitions(42, r, 6, 3)
        ph = row["phases"]
        assert [ph[p]["num_replies"] for p in ("train.embed", "train.head", "train.back")] == [
            6,
            6,
            6,
        ]  # 3 clients x 2 steps
        assert ph["train.evalhead"]["num_replies"] == 6  # every client evaluated
        assert [len(c) for c in row["cos_steps"]] == [3, 3]
        tasks = sorted(task.task_of(p) for p in row["sampled_partitions"])
        assert sorted(row["grad_tasks"]) == tasks
    assert (
        rounds[1]["sampled_partitions"] != rounds[2]["sampled_partitions"]
    )  # [2, 3, 5], [0, 1, 3]
