"""FedTA app: the ClientApp called directly, an in-process smoke run and a `flwr run` end-to-end
run (tiny configs)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flowerbed.common.testing import app_path, mock_reply, node_context

app_path("fedta")
from fedta import client_app, task  # noqa: E402
from fedta.pretrain import load_backbone  # noqa: E402

# a tiny backbone (built on the fly into the cache dir under its own name) and tiny data
TINY = {
    "vit-dim": 16,
    "vit-heads": 2,
    "vit-depth": 1,
    "pretrain-size": 300,
    "pretrain-epochs": 1,
    "samples-per-class": 40,
    "min-samples": 5,
    "test-per-class": 10,
    "local-epochs": 1,
    "pool-size": 4,
    "top-n": 2,
    "num-anchors": 5,
    "sikf-steps": 2,
}


def _context(run_config, pid=1, n=3):
    return node_context(pid, n, run_config)


@pytest.mark.parametrize("method", ["fedta", "fedta-no-ta", "fedvit"])
def test_client_train_call_directly(method):
    run_config = {**TINY, "num-tasks": 2, "num-server-rounds": 2, "method": method}
    cfg = task.parse_config(run_config)
    bb = load_backbone(cfg)
    arrays = task.record_of(task.initial_global(cfg, bb))
    content = RecordDict(
        {
            "arrays": arrays,
            "protos": ArrayRecord(),
            "config": ConfigRecord({"task": 1, "server-round": 2}),
        }
    )
    ctx = _context(run_config)
    torch.set_num_threads(2)
    out = client_app.train(mock_reply(content), ctx).content
    # one torch thread: FedTA is not bitwise reproducible with more (fedta.task.one_thread)
    assert torch.get_num_threads() == 1
    again = client_app.train(mock_reply(content), _context(run_config)).content
    assert all(
        np.array_equal(out["arrays"][k].numpy(), again["arrays"][k].numpy())
        for k in again["arrays"]
    )
    stream = client_app.stream_of(ctx, cfg, 1)
    assert list(out["info"]["classes"]) == stream[1]  # task 1 of this client's stream
    assert sorted(out["arrays"].keys()) == sorted(arrays.keys())
    assert out["metrics"]["num-examples"] > 0
    # exactly what a reply carries (README "What is sent"): the shared parameters, the metrics,
    # the class list and, for FedTA, one prototype per class of the task plus (with tail anchors)
    # the one TA key that class matched most; never the TA values, the gate or the private head
    assert sorted(out.keys()) == sorted(
        ["arrays", "metrics", "info"] + ["protos"] * (method != "fedvit")
    )
    protos = sorted(out["protos"].keys()) if "protos" in out.array_records else []
    kinds = {"fedta": "kp", "fedta-no-ta": "p", "fedvit": ""}[method]
    assert protos == [f"{k}.{c}" for k in kinds for c in sorted(stream[1])]
    if method == "fedta":
        ta_keys = task.tensors_of(ctx.state["personal"])["ta_keys"].numpy()
        for c in stream[1]:
            k = out["protos"][f"k.{c}"].numpy()
            assert min(np.abs(ta_keys - k).max(axis=1)) == 0.0  # a row of the private key bank
        private = task.tensors_of(ctx.state["personal"])
        sent = [a.numpy() for rec in out.array_records.values() for a in rec.values()]
        for name in ("ta", "head.weight"):
            assert not any(a.shape == private[name].shape for a in sent), name


def test_inprocess_smoke_fedta(tmp_path):
    from flowerbed.simulation.inprocess import run_app

    out = tmp_path / "fedta"
    run_app(
        "fedta",
        {**TINY, "num-tasks": 2, "num-server-rounds": 2, "bgps-warmup": 0, "results-dir": str(out)},
        num_supernodes=3,
    )
    res = json.loads((out / "results.json").read_text())
    final = res["extra"]["final"]
    assert {"acc_t1", "acc_t2", "kr_t", "kr_s", "upload_bytes_per_client_round"} <= set(final)
    # after task 2 each client is tested on its 4 classes among >= 4 seen ones: chance <= 0.25
    # (measured 0.475); the global model keeps most of the local model's accuracy (0.93)
    assert final["acc_t2"] > 0.3 and final["kr_s"] > 0.5
    rounds = {r["round"]: r for r in res["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert [rounds[r]["num_train_replies"] for r in (1, 2)] == [3, 3]
    assert [rounds[r]["task"] for r in (1, 2)] == [0, 1]
    assert [rounds[r]["eval_task"] for r in (1, 2)] == [0, 1]  # one round per task
    assert len(rounds[2]["per_client"]) == 3
    assert final["acc_t2"] == pytest.approx(rounds[2]["acc"])
    # bytes come from the protocol layer: 3 uploads per round, the mean is the final upload
    train = rounds[1]["phases"]["train"]
    assert train["num_replies"] == 3 and rounds[1]["bytes_received"] > train["bytes_received"]
    assert final["upload_bytes_per_client_round"] == pytest.approx(
        (
            rounds[1]["phases"]["train"]["bytes_received"]
            + rounds[2]["phases"]["train"]["bytes_received"]
        )
        / 6
    )
    # every client's first task has 2 classes; chance with >= 2 candidate classes is <= 0.5
    assert final["acc_t1"] > 0.5
    # the upload: a 4 x 2 x 16 prompt pool, 4 x 16 keys, 2 classes x (prototype + TA key)
    assert final["upload_values_per_client_round"] == 4 * 2 * 16 + 4 * 16 + 2 * (16 + 16)
    assert rounds[1]["num_global_protos"] >= 2  # BGPS picked one per uploaded class


@pytest.mark.e2e
def test_flwr_run_two_rounds(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    proc = flwr_run(
        "fedta",
        {**TINY, "num-tasks": 2, "num-server-rounds": 2, "results-dir": str(out)},
        num_supernodes=2,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2] and "finished_at" in res
    assert set(res["extra"]["final"]) >= {"acc_t1", "acc_t2", "kr_t", "kr_s"}
    assert all(res["rounds"][r]["bytes_sent"] > 0 for r in (1, 2))


@pytest.mark.parametrize(
    "arg, line",
    [
        ("num-server-rounds=7", "num-server-rounds=7: must be a multiple of num-tasks=5"),
        ("rounds-per-task=2", "unknown run config key 'rounds-per-task'"),
    ],
)
def test_runner_rejects_bad_config_in_one_line(tmp_path, arg, line):
    cmd = [
        sys.executable,
        "-m",
        "flowerbed.simulation.runner",
        "app=fedta",
        f"++run_config.{arg}",
        f"hydra.run.dir={tmp_path}",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("flowerbed-run: error:") and line in last, p.stderr[-1000:]
