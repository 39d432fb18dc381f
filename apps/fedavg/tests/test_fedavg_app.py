"""The FedAvg reference app: ClientApp call, config errors, in-process smoke run, flwr run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from flowerbed.common.config import ConfigError
from flowerbed.common.testing import app_path, mock_reply

app_path("fedavg")
from fedavg import client_app, task  # noqa: E402

FAST = {"num-server-rounds": 2, "local-steps": 20, "batch-size": 32, "lr": 0.05}


def test_client_train_call_directly():
    cfg = task.parse_config(FAST)
    content = RecordDict(
        {"arrays": task.initial_arrays(cfg), "config": ConfigRecord({"server-round": 1})}
    )
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 1, "num-partitions": 4},
        state=RecordDict(),
        run_config=dict(FAST),
    )
    out = client_app.train(mock_reply(content), ctx)
    metrics = out.content["metrics"]
    assert metrics["steps"] == 20 and metrics["num-examples"] > 1000
    before = content["arrays"]
    after = out.content["arrays"]
    assert list(after.keys()) == list(before.keys())
    assert any(not np.array_equal(after[k].numpy(), before[k].numpy()) for k in after)
    # same (seed, partition, round) -> identical update, whatever process runs it
    again = client_app.train(mock_reply(content), ctx).content["arrays"]
    assert all(np.array_equal(after[k].numpy(), again[k].numpy()) for k in after)


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"alpha": -1.0}, "alpha=-1.0"),
        ({"num-server-rounds": "many"}, "num-server-rounds='many'"),
        ({"partitioner": "zipf"}, "partitioner='zipf'"),
        ({"dataset": "cifar11"}, "dataset='cifar11': unknown dataset"),
        ({"no-such-key": 1}, "unknown run config key 'no-such-key'"),
    ],
)
def test_bad_run_config_names_the_value(bad, needle):
    with pytest.raises((ConfigError, ValueError), match=needle):
        task.parse_config(bad)


def test_runner_rejects_bad_config_in_one_line(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "flowerbed.simulation.runner",
        "++run_config.alpha=-2",
        f"hydra.run.dir={tmp_path}",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        "flowerbed-run: error: run config alpha=-2.0: Dirichlet alpha > 0"
    )
    p = subprocess.run(cmd[:3] + ["app=nosuchapp"], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "nosuchapp" in p.stderr


def test_inprocess_smoke_run(tmp_path):
    from flowerbed.simulation.inprocess import run_app

    out = tmp_path / "run"
    run_app("fedavg", {**FAST, "results-dir": str(out)}, num_supernodes=3)
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[0]["server_accuracy"] < 0.2  # untrained model: chance level
    assert rec["extra"]["final"]["accuracy"] > rounds[0]["server_accuracy"] + 0.1
    assert rounds[1]["num_train_replies"] == 3 and rounds[1]["num_failures"] == 0
    assert rounds[1]["bytes_sent"] > 3 * 800_000 and rounds[1]["bytes_received"] > 3 * 800_000
    hist = np.array(rec["extra"]["label_histograms"])
    assert hist.shape == (3, 10) and hist.sum() == 60000
    assert rec["config"]["seed"] == 42 and rec["versions"]["flwr"]

    # the same run without Ray (launcher=local) gives the same model: seeds come from
    # (seed, partition, round), not from which actor ran which client in which order
    from flowerbed.simulation.local import run_local

    run_local("fedavg", {**FAST, "results-dir": str(tmp_path / "local")}, num_supernodes=3)
    loc = json.loads((tmp_path / "local" / "results.json").read_text())["extra"]["final"]
    assert loc["loss"] == pytest.approx(rec["extra"]["final"]["loss"], rel=1e-4)


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    pyproject = (Path(app_path("fedavg")) / "pyproject.toml").read_text()
    p = flwr_run("fedavg", {**FAST, "results-dir": str(out)}, num_supernodes=2, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fedavg fedavg: final accuracy" in p.stdout
    rec = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in rec["rounds"]] == [0, 1, 2]
    assert rec["extra"]["final"]["accuracy"] > 0.2
    # flwr run must not have rewritten the app's pyproject
    assert (Path(app_path("fedavg")) / "pyproject.toml").read_text() == pyproject


def test_fedavg_runs_under_a_shared_attack(tmp_path):
    """The shared attack fragment on the reference app: sign-flip on 2 of 4 clients (scale 3)
    drags FedAvg below the attack-free run, and results.json names the attackers."""
    from flowerbed.simulation.local import run_local

    tiny = {"dataset": "digits", "model": "mlp", "partitioner": "iid", "num-server-rounds": 3}
    tiny.update({"local-steps": 10, "batch-size": 32, "lr": 0.1})
    runs = {}
    for name, over in (
        ("clean", {}),
        ("attacked", {"attack": "sign-flip", "attack-fraction": 0.5, "attack-scale": 3.0}),
    ):
        out = tmp_path / name
        run_local("fedavg", {**tiny, **over, "results-dir": str(out)}, num_supernodes=4)
        runs[name] = json.loads((out / "results.json").read_text())
    clean, attacked = (runs[k]["extra"]["final"]["accuracy"] for k in ("clean", "attacked"))
    assert clean > 0.6 and attacked < clean - 0.3
    assert runs["attacked"]["rounds"][1]["malicious_partitions"] == [0, 1]
    assert "malicious_partitions" not in runs["clean"]["rounds"][1]


def test_participation_gap_smoke(tmp_path):
    """Participation-gap evaluation on (issue 16): 1 of 5 clients never trains (its train call
    would raise ParticipationError, counted as a failure), every client is evaluated on its
    splits each round, and the gap columns are in results.json per round and in ``final``."""
    from flowerbed.common.participation import unparticipating_partitions
    from flowerbed.simulation.local import run_local

    tiny = {"dataset": "digits", "model": "mlp", "partitioner": "iid", "num-server-rounds": 2}
    tiny.update({"local-steps": 10, "batch-size": 32, "lr": 0.1, "unparticipating-fraction": 0.2})
    out = tmp_path / "gap"
    run_local("fedavg", {**tiny, "results-dir": str(out)}, num_supernodes=5)
    rec = json.loads((out / "results.json").read_text())
    unpart = unparticipating_partitions(5, 0.2, 42)
    assert len(unpart) == 1
    for r in rec["rounds"][1:]:
        assert r["num_sampled"] == 4 and r["num_train_replies"] == 4 and r["num_failures"] == 0
        assert r["unparticipating_partitions"] == unpart and r["num_gap_replies"] == 5
        assert r["client_num_part_clients"] == 4 and r["client_num_unpart_clients"] == 1
        gap = r["client_part_val_accuracy_mean"] - r["client_unpart_accuracy_mean"]
        assert r["client_participation_gap_accuracy"] == pytest.approx(gap)
        oos = r["client_part_train_accuracy_mean"] - r["client_part_val_accuracy_mean"]
        assert r["client_out_of_sample_gap_accuracy"] == pytest.approx(oos)
        p = [r[f"client_part_val_accuracy_p{q}"] for q in (10, 50, 90)]
        assert p == sorted(p) and 0 <= p[0] <= p[2] <= 1
        # per-client rows: one per client, the server's partition ids, label histograms that
        # match the partitioning, and means that reproduce the summary columns
        rows = r["gap_clients"]
        assert [c["partition_id"] for c in rows] == list(range(5))
        assert [c["participating"] for c in rows] == [int(i not in unpart) for i in range(5)]
        hist = np.array(rec["extra"]["label_histograms"])
        for c in rows:
            pid, split = c["partition_id"], "unpart" if c["partition_id"] in unpart else None
            if split:
                assert c["unpart_label_counts"] == hist[pid].tolist()
            else:
                both = np.add(c["part_train_label_counts"], c["part_val_label_counts"])
                assert both.tolist() == hist[pid].tolist()
                assert c["part_val_num_examples"] == round(0.2 * hist[pid].sum())
            for k in ("unpart",) if split else ("part_train", "part_val"):
                hits, counts = np.array(c[f"{k}_class_correct"]), c[f"{k}_label_counts"]
                assert np.all(hits <= counts) and hits.sum() == round(
                    c[f"{k}_accuracy"] * sum(counts)
                )
        val = [c["part_val_accuracy"] for c in rows if c["participating"]]
        assert r["client_part_val_accuracy_mean"] == pytest.approx(np.mean(val))
        w = [c["part_val_num_examples"] for c in rows if c["participating"]]
        assert r["client_part_val_accuracy_wmean"] == pytest.approx(np.average(val, weights=w))
    final = rec["extra"]["final"]
    assert final["part_train_accuracy_mean"] > 0.3  # 2 rounds on digits: above chance (0.1)
    assert "participation_gap_accuracy" in final and "out_of_sample_gap_accuracy" in final
    # digits: 1437 train examples, 5 iid partitions; 80% of the 4 participating ones train
    hist = np.array(rec["extra"]["label_histograms"])
    assert hist.sum() == 1437
    assert rec["config"]["unparticipating-fraction"] == 0.2
