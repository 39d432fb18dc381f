"""FL-LLaMA app: config, the task data, client-batch == sum of per-client B gradients, in-process
runs of every method on the tiny LLaMA asserting on results.json (loss falls, split with one
client == centralized, mask-compression bytes by hand), and one `flwr run` end to end."""

import copy
import json

import numpy as np
import pytest
import torch

from flowerbed.common.config import ConfigError, check_pyproject
from flowerbed.common.testing import app_path

APP = app_path("fl-llama")

from flllama import data as D  # noqa: E402
from flllama import task  # noqa: E402
from flllama.methods import METHODS  # noqa: E402
from flllama.split import SplitLlama, add_lora, layer_of  # noqa: E402

TINY = {
    "model": "tiny",
    "num-server-rounds": 2,
    "sync-steps": 3,
    "max-chars": 40,
    "lr": 5e-3,
    "eval-samples": 24,
}


def test_pyproject_defaults_are_the_schema_defaults():
    assert check_pyproject(APP, task.SCHEMA) == []


def test_bad_key_or_value_is_one_line():
    with pytest.raises(ConfigError, match=r"^unknown run config key 'p'; valid keys: "):
        task.parse_config({"p": 1})
    with pytest.raises(ConfigError, match=r"method='fedavg': must be one of split-sequential"):
        task.parse_config({"method": "fedavg"})
    with pytest.raises(ConfigError, match=r"^run config grad-dp-noise=1.0: needs grad-dp-clip > 0"):
        task.parse_config({"grad-dp-noise": 1.0})
    with pytest.raises(ConfigError, match="top-p"):
        task.parse_config({"top-p": 0.0})


def test_task_is_deterministic_and_split_by_topic():
    rows = D.load_summaries()
    assert len(rows) == 10033 and len({r[2] for r in rows}) == 12
    train, test = D.split(rows)
    assert len(test) == 1004 and not set(train) & set(test)
    pools = [task.client_pool(p, 3) for p in range(3)]
    for p, pool in enumerate(pools):
        assert {rows[i][2] % 3 for i in pool} == {p}  # client p holds topics t = p mod 3
    assert sum(len(p) for p in pools) == len(train)
    cfg = task.parse_config(TINY)
    a = task.client_batch(cfg, 1, 3, 2, 0)
    b = task.client_batch(cfg, 1, 3, 2, 0)
    c = task.client_batch(cfg, 1, 3, 2, 1)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(
        a["input_ids"], c["input_ids"]
    )
    # only the target (topic) token is scored, the tokens left of it are the prompt
    assert ((a["labels"] != -100).sum(-1) == 1).all()
    assert (a["labels"][:, -1] == 1 + a["topic"]).all()


def test_client_batch_b_gradient_is_the_sum_of_per_client_gradients():
    """Left-padding two clients' hidden states into one batch (masks from counts) gives B the
    same LoRA gradient as the two clients' separate passes, summed."""
    model = add_lora(task.build_model("tiny", 3), 4, 8, 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    h1, c1 = torch.randn(2, 5, 32, generator=g), torch.tensor([3, 5])
    h2, c2 = torch.randn(1, 7, 32, generator=g), torch.tensor([6])
    w1, w2 = torch.randn(2, 5, 32, generator=g), torch.randn(1, 7, 32, generator=g)

    def grads(m):
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    sep = copy.deepcopy(model)
    s = SplitLlama(sep, 1, 1)
    (s.forward_b(h1, c1) * w1).sum().backward()
    (s.forward_b(h2, c2) * w2).sum().backward()
    want = grads(sep)
    bat = copy.deepcopy(model)
    s = SplitLlama(bat, 1, 1)
    h = torch.cat([torch.cat([torch.zeros(2, 2, 32), h1], 1), h2])
    w = torch.cat([torch.cat([torch.zeros(2, 2, 32), w1], 1), w2])
    (s.forward_b(h, torch.cat([c1, c2])) * w).sum().backward()
    got = grads(bat)
    assert sorted(got) == sorted(want) and all(layer_of(n) in (1, 2) for n in got)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-5), n


def _run(tmp_path, name, num_supernodes=2, **over):
    from flowerbed.simulation.local import run_local

    out = tmp_path / name
    run_local("fl-llama", {**TINY, **over, "results-dir": str(out)}, num_supernodes=num_supernodes)
    rec = json.loads((out / "results.json").read_text())
    return rec, {r["round"]: r for r in rec["rounds"]}


@pytest.mark.parametrize("method", METHODS.names)
def test_every_method_runs_and_the_loss_falls(tmp_path, method):
    rec, rounds = _run(tmp_path, method, method=method)
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[2]["server_loss"] < rounds[0]["server_loss"] - 0.05
    if method == "centralized":
        assert rec["extra"]["totals"]["bytes_sent"] == 0
        return
    assert rounds[1]["steps"] == 3 and rounds[1]["num_rejected"] == 0
    assert rounds[2]["loss"] < rounds[1]["loss_first_step"]
    ph = rounds[1]["phases"]
    per_step = 1 if method != "split-sequential" else 2  # exchanges per step (sequential: 1/client)
    assert ph["train.forward"]["calls"] == 3 * per_step and ph["train.sync"]["num_replies"] == 2
    assert rounds[1]["bytes_per_step"] > 4 * 2 * (4 * 41 * 32 * 4)  # 4 tensors, 2 clients


def test_split_with_one_client_equals_centralized(tmp_path):
    """One client, sequential: the split steps are exactly the centralized LoRA steps."""
    _, split = _run(tmp_path, "split", 1, method="split-sequential")
    _, cen = _run(tmp_path, "cen", 1, method="centralized")
    for r in (1, 2):
        assert split[r]["server_loss"] == pytest.approx(cen[r]["server_loss"], abs=1e-5)
        assert split[r]["loss"] == pytest.approx(cen[r]["train_loss"], abs=1e-5)
    assert split[2]["server_loss"] < split[0]["server_loss"] - 0.05


def test_noise_changes_training_and_mask_compression_bytes_by_hand(tmp_path):
    over = {"num-server-rounds": 1, "sync-steps": 2, "gen-tokens": 2, "temperature": 0.5}
    _, base = _run(tmp_path, "base", **over)
    assert 0 <= base[1]["server_gen_accuracy"] <= 1  # sampled generation ran in the harness
    _, full = _run(tmp_path, "full", **{**over, "mask-compression": False})
    _, noisy = _run(tmp_path, "noisy", **{**over, "sigma": 0.5})
    _, dp = _run(tmp_path, "dp", **{**over, "grad-dp-clip": 0.04, "grad-dp-noise": 1.0})
    assert abs(dp[1]["loss"] - base[1]["loss"]) > 1e-4 and np.isfinite(dp[1]["server_loss"])
    assert full[1]["server_loss"] == pytest.approx(base[1]["server_loss"], abs=1e-6)
    assert abs(noisy[1]["loss"] - base[1]["loss"]) > 1e-4
    # by hand: per forward reply, the 4-D mask (b*L*L float32) and position ids (b*L int64)
    # replace the counts (b int64); L of each client's batch from the task
    cfg = task.parse_config({**TINY, **over})
    extra = 0
    for pid in range(2):
        for step in range(2):
            b, length = task.client_batch(cfg, pid, 2, 1, step)["input_ids"].shape
            extra += b * length * length * 4 + b * length * 8 - b * 8
    diff = (
        full[1]["phases"]["train.forward"]["bytes_received"]
        - base[1]["phases"]["train.forward"]["bytes_received"]
    )
    assert extra <= diff <= extra + 4 * 200
    sent = [base[1]["phases"][p]["bytes_sent"] for p in ("train.c", "train.a")]
    assert sent == [full[1]["phases"][p]["bytes_sent"] for p in ("train.c", "train.a")]


def test_server_rejects_a_client_with_a_wrong_hidden_width(tmp_path, monkeypatch):
    """A client whose A returns a wrong hidden width is rejected by name; B and the adapters
    stay finite and the other client trains."""
    orig = task.client_forward

    def bad(cfg, state, pid, n, rnd, step, lora):
        out = orig(cfg, state, pid, n, rnd, step, lora)
        if pid == 1:
            out["h"] = np.concatenate([out["h"], out["h"][..., :1]], -1)
        return out

    from flllama import client_app

    monkeypatch.setattr(client_app, "client_forward", bad)
    rec, rounds = _run(tmp_path, "bad", **{"num-server-rounds": 1})
    reasons = rounds[1]["phases"]["train.forward"]["failure_reasons"]
    assert reasons[0].startswith("node 2: rejected, hidden state has shape (4, ")
    assert reasons[0].endswith(", 33), expected (batch, tokens, 32)")
    assert rounds[1]["num_rejected"] == 3 and np.isfinite(rounds[1]["server_loss"])


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    p = flwr_run(
        "fl-llama",
        {**TINY, "num-server-rounds": 1, "sync-steps": 2, "results-dir": str(out)},
        num_supernodes=2,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1] and rounds[1]["steps"] == 2
    assert rounds[1]["phases"]["train.a"]["num_replies"] == 4  # 2 steps x 2 clients


def test_client_lr_scale_changes_only_the_clients_a_and_c_optimizers():
    cfg = task.parse_config({**TINY, "client-lr-scale": 2.0})
    for block in ("a", "c"):
        opt = task._block(cfg, {}, 0, 2, 1, 0, block)[4]
        assert opt.param_groups[0]["lr"] == pytest.approx(2 * TINY["lr"])
    assert task.TorchServerBlock(cfg).opts[0].param_groups[0]["lr"] == pytest.approx(TINY["lr"])
    base = task.parse_config(TINY)
    assert task._block(base, {}, 0, 2, 1, 0, "c")[4].param_groups[0]["lr"] == TINY["lr"]


def test_generated_accuracy_counts_prefix_matches_with_seeds_from_seed_partition_round(
    monkeypatch,
):
    """The harness generates through the split model with the run's temperature / top-p and a
    seed from (seed, partition, round, batch); an example counts when the generated tokens
    start with its target. A fake generator answers the target for every other example."""
    cfg = task.parse_config({**TINY, "gen-tokens": 2, "temperature": 0.1, "top-p": 0.9})
    calls = []

    def fake(client, server, ids, counts, n, temperature, top_p, seed, **_):
        calls.append((n, temperature, top_p, seed))
        out = torch.full((len(ids), n), 63)
        for i in range(0, len(ids), 2):
            out[i, 0] = answers.pop(0)
        return out

    idx = np.asarray(D.split(task.rows())[1][:20])
    tok = task.tokenizer(cfg)
    targets = [tok.target(task.rows()[int(i)][2]) for i in idx]
    answers = [t[0] for t in targets[0:16:2]] + [t[0] for t in targets[16:20:2]]
    monkeypatch.setattr(task, "split_generate", fake)
    acc = task.generated_accuracy(cfg, None, idx, 3)
    assert acc == pytest.approx(10 / 20)  # one target token (char tokenizer): 10 of 20 match
    assert [c[:3] for c in calls] == [(2, 0.1, 0.9)] * 2  # batches of 16 and 4
    assert [c[3] for c in calls] == [
        task.sample_seed(42, task.SERVER_PARTITION, 3, k) for k in (0, 1)
    ]
    assert (
        len({task.sample_seed(42, 0, 3), task.sample_seed(42, 1, 3), task.sample_seed(42, 0, 4)})
        == 3
    )
