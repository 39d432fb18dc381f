"""FedIDM app: config, the client steps called directly (label flipping, the condensed set), a
tiny run on sklearn digits (no Ray) asserting on results.json, and one `flwr run` end to end."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from flowerbed.common.config import ConfigError, check_pyproject
from flowerbed.common.testing import app_path, mock_reply, node_context

APP = app_path("fedidm")

from fedidm import client_app, task  # noqa: E402
from fedidm.methods import METHODS  # noqa: E402

#: digits, an MLP, 5 clients, few steps: seconds per run
TINY = {
    "dataset": "digits",
    "partitioner": "iid",
    "local-steps": 10,
    "lr": 0.1,
    "dm-steps": 10,
    "ipc": 2,
    "server-steps": 5,
}


def test_pyproject_defaults_are_the_schema_defaults():
    assert check_pyproject(APP, task.SCHEMA) == []


def test_method_table_rows():
    assert METHODS.names == (
        "fedidm",
        "fedavg",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
        "bulyan",
        "fltrust",
    )


def test_bad_attack_options_are_one_line():
    with pytest.raises(ConfigError, match=r"^run config attack-fraction=1.0: malicious fraction"):
        task.parse_config({"attack-fraction": 1.0})
    with pytest.raises(ConfigError, match=r"^run config attack='fang': must be one of"):
        task.parse_config({"attack": "fang"})


def _call(pid, cfg_over, rnd=1):
    cfg = task.parse_config({**TINY, **cfg_over})
    content = RecordDict(
        {"arrays": task.initial_arrays(cfg), "config": ConfigRecord({"server-round": rnd})}
    )
    return client_app.train(mock_reply(content), node_context(pid, 5, run_config=cfg)).content


def test_detection_counts_by_hand():
    """Two rounds counted by hand: round 1 rejects attackers 1, 2 and benign 7 of attackers
    {1, 2, 3}; round 2 rejects no one; round 0 (no attack columns) is skipped."""
    rounds = [
        {"round": 0, "server_accuracy": 0.1},
        {"round": 1, "rejected_nodes": [1, 2, 7], "malicious_nodes": [1, 2, 3]},
        {"round": 2, "rejected_nodes": [], "malicious_nodes": [1, 2, 3]},
    ]
    for r in rounds[1:]:
        r["num_train_replies"] = 10
    got = task.detection_counts(rounds)
    want = {"tp": 2, "fp": 1, "fn": 4, "rounds": 2}
    assert got == {**want, "attacker_updates": 6, "benign_updates": 14}
    # the README's detection table pools two such runs (two seeds): precision 4 / 6, recall
    # 4 / 12; the mean of the rounds' precision (2/3 and 1.0 for the empty round) is 5/6
    spec = importlib.util.spec_from_file_location("dt", APP / "docs" / "detection_table.py")
    dt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dt)
    final = {"detect_precision": 5 / 6, "detect_recall": 1 / 3}
    run = {"rounds": rounds, "extra": {"final": final}}
    row = dt.row({0: run, 1: run})
    assert row["pooled_precision"] == pytest.approx(2 / 3)
    assert row["pooled_recall"] == pytest.approx(1 / 3)
    assert row["benign_rejected"] == pytest.approx(2 / 28)
    assert row["precision"] == pytest.approx((5 / 6, 0.0))
    assert (row["tp"], row["fp"], row["fn"], row["seeds"]) == (4, 2, 8, [0, 1])


def test_label_flip_attacker_trains_on_flipped_labels():
    cfg = task.parse_config({**TINY, "attack": "label-flip", "attack-fraction": 0.2})
    x, y, _ = task.client_data(cfg, node_context(0, 5))  # partition 0: malicious
    x2, y2, _ = task.client_data(task.parse_config(TINY), node_context(0, 5))
    assert torch.equal(y, 9 - y2)
    _, y3, _ = task.client_data(cfg, node_context(1, 5))  # benign
    _, y4, _ = task.client_data(task.parse_config(TINY), node_context(1, 5))
    assert torch.equal(y3, y4)


def test_condense_matches_the_class_means_better_than_its_start():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 4, 4, generator=g)
    y = torch.arange(200) % 2
    x[y == 1] += 1.0
    start, _ = task.condense(x, y, 2, 3, 0, 0.1, seed=1)
    sx, sy = task.condense(x, y, 2, 3, 100, 0.1, seed=1)
    assert sx.shape == (6, 1, 4, 4) and sy.tolist() == [0, 0, 0, 1, 1, 1]
    for c in (0, 1):  # the synthetic class mean moves to the real one (measured: 40x closer)
        real = x[y == c].numpy().mean(0)
        after = np.abs(sx[sy == c].mean(0) - real).mean()
        assert after < 0.25 * np.abs(start[sy == c].mean(0) - real).mean()
    again, _ = task.condense(x, y, 2, 3, 100, 0.1, seed=1)
    assert np.array_equal(sx, again)  # seeded


def test_fedidm_client_uploads_a_synthetic_set():
    out = _call(1, {})
    syn = out["synthetic"]
    assert syn["x"].numpy().shape[1:] == (1, 8, 8)
    assert len(syn["x"].numpy()) == len(syn["y"].numpy()) == 2 * len(set(syn["y"].numpy()))
    assert "synthetic" not in _call(1, {"method": "fedavg"}).array_records


def _run(tmp_path, name, **over):
    from flowerbed.simulation.local import run_local

    out = tmp_path / name
    run_local(
        "fedidm",
        {**TINY, "num-server-rounds": 4, "results-dir": str(out), **over},
        num_supernodes=5,
    )
    return json.loads((out / "results.json").read_text())


def test_sign_flip_breaks_fedavg_and_fedidm_rejects_the_attackers(tmp_path):
    attack = {"attack": "sign-flip", "attack-fraction": 0.4, "attack-scale": 3.0}
    attack["local-steps"] = 30  # 10 steps x 4 rounds left the clean run at ~0.59
    clean = _run(tmp_path, "clean", method="fedavg", **{"local-steps": 30})
    avg = _run(tmp_path, "avg", method="fedavg", **attack)
    idm = _run(tmp_path, "idm", method="fedidm", **attack)
    acc = {k: r["extra"]["final"]["accuracy"] for k, r in (("c", clean), ("a", avg), ("i", idm))}
    assert acc["c"] > 0.5 and acc["a"] < acc["c"] - 0.2, acc  # FedAvg collapses under the attack
    # FedIDM stays far above the collapsed FedAvg; measured at 97c2f7d (first version): clean
    # 0.694, FedAvg under attack 0.103, FedIDM 0.592
    assert acc["i"] > acc["a"] + 0.3, acc
    rows = [r for r in idm["rounds"] if r["round"] > 0]
    assert all(r["malicious_partitions"] == [0, 1] for r in rows)
    assert all(len(r["rejected_nodes"]) >= 2 for r in rows)
    assert idm["extra"]["final"]["detect_recall"] == 1.0
    assert idm["extra"]["final"]["detect_precision"] > 0.5
    assert "acc_std_last10" in idm["extra"]["final"]


@pytest.mark.parametrize("method", [m for m in METHODS.names if m not in ("fedidm", "fedavg")])
def test_every_baseline_runs_under_attack(tmp_path, method):
    rec = _run(tmp_path, method, method=method, attack="lie", **{"attack-fraction": 0.2})
    assert rec["extra"]["final"]["accuracy"] > 0.3
    assert rec["rounds"][1]["malicious_partitions"] == [0]


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    over = {**TINY, "num-server-rounds": 1, "results-dir": str(out), "attack": "sign-flip"}
    p = flwr_run("fedidm", {**over, "attack-fraction": 0.4}, num_supernodes=3)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in rec["rounds"]] == [0, 1]
    assert rec["rounds"][1]["malicious_partitions"] == [0]


#: the README's 30 % setting: Fashion-MNIST, 20 clients, Dirichlet 0.5, seed 0, 10 rounds
SLOW = {"num-server-rounds": 10, "seed": 0}


@pytest.fixture(scope="module")
def no_attack_accuracy(tmp_path_factory):
    from flowerbed.simulation.local import run_local

    out = tmp_path_factory.mktemp("none")
    run_local("fedidm", {**SLOW, "results-dir": str(out)}, num_supernodes=20)
    return json.loads((out / "results.json").read_text())["extra"]["final"]["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["sign-flip", "lie"])
def test_fedidm_at_30_percent_stays_near_its_no_attack_accuracy(
    tmp_path, no_attack_accuracy, attack
):
    """Issue #15's target (minutes per run on 2 cores): FedIDM under attack at 30 % within 3
    points of its no-attack accuracy. See the README "Results" for what it measured."""
    from flowerbed.simulation.local import run_local

    over = {**SLOW, "attack": attack, "attack-fraction": 0.3, "results-dir": str(tmp_path)}
    run_local("fedidm", over, num_supernodes=20)
    acc = json.loads((tmp_path / "results.json").read_text())["extra"]["final"]["accuracy"]
    print(f"fedidm {attack} 30 %: {acc:.4f}, no attack {no_attack_accuracy:.4f}")
    assert acc > no_attack_accuracy - 0.03, (acc, no_attack_accuracy)


def test_participation_gap_smoke(tmp_path):
    """Participation-gap evaluation on (issue 16) under FedIDM: 1 of 5 clients never trains
    (its train call would raise, a failure), every client answers the gap evaluation, and the
    gap columns and the per-client rows are in results.json."""
    from flowerbed.common.participation import unparticipating_partitions

    rec = _run(tmp_path, "gap", **{"num-server-rounds": 2, "unparticipating-fraction": 0.2})
    unpart = unparticipating_partitions(5, 0.2, TINY.get("seed", 42))
    assert len(unpart) == 1
    for r in rec["rounds"][1:]:
        assert r["phases"]["train"]["num_sent"] == 4 and r["num_failures"] == 0
        assert r["unparticipating_partitions"] == unpart and r["num_gap_replies"] == 5
        rows = r["gap_clients"]
        assert [c["participating"] for c in rows] == [int(i not in unpart) for i in range(5)]
        val = [c["part_val_accuracy"] for c in rows if c["participating"]]
        assert r["client_part_val_accuracy_mean"] == pytest.approx(np.mean(val))
        gap = r["client_part_val_accuracy_mean"] - r["client_unpart_accuracy_mean"]
        assert r["client_participation_gap_accuracy"] == pytest.approx(gap)
    final = rec["extra"]["final"]
    assert final["part_train_accuracy_mean"] > 0.3 and "participation_gap_accuracy" in final
    assert "accuracy" in final and "acc_std_last10" in final  # the app's own columns stay


def test_finetune_from_reaches_the_strategy():
    for value in (1, 2):
        cfg = task.parse_config({**TINY, "finetune-from": value})
        strategy = cfg.method.strategy(cfg, num_nodes=5, num_classes=10)
        assert strategy.finetune and strategy.finetune_from == value
    with pytest.raises(ConfigError, match=r"^run config finetune-from=0"):
        task.parse_config({"finetune-from": 0})
