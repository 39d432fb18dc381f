"""PrivFusion in-process smoke run and `flwr run` end-to-end test (tiny data)."""

from __future__ import annotations

import json
import math

import pytest

from flowerbed.common.testing import app_path

app_path("privfusion")

TINY = {
    "dataset": "breast_cancer",
    "local-epochs": 2,
    "batch-size": 32,
    "hidden": "16,8",
    "act-samples": 100,
}


def test_inprocess_smoke_run(tmp_path):
    from flowerbed.simulation.inprocess import run_app

    out = tmp_path / "smoke"
    run_app("privfusion", {**TINY, "epsilon": 4.0, "results-dir": str(out)}, num_supernodes=3)
    res = json.loads((out / "results.json").read_text())
    fin = res["extra"]["final"]
    rounds = {r["round"]: r for r in res["rounds"]}
    assert sorted(rounds) == [0, 1]  # one-shot: one round of three phases
    phases = rounds[1]["phases"]
    assert list(phases) == ["train.local", "train.align", "train.fuse"]
    assert [phases[p]["num_replies"] for p in phases] == [3, 2, 1]
    assert all(phases[p]["num_failures"] == 0 for p in phases)
    # bytes come from the protocol layer (wire_nbytes), per phase and per round
    assert rounds[1]["bytes_sent"] == sum(phases[p]["bytes_sent"] for p in phases)
    assert rounds[1]["bytes_received"] == sum(phases[p]["bytes_received"] for p in phases)
    assert fin["bytes_sent"] == rounds[1]["bytes_sent"] > 0
    assert fin["bytes_received"] == rounds[1]["bytes_received"] > 0
    # the relay sends the reference package (weights + acts) to each of the 2 other parties,
    # and their 2 aligned models (without their metrics) to the fusing party
    w = phases["train.align"]["bytes_received"] / 2  # one aligned model + its metrics
    assert 1.5 * w < phases["train.fuse"]["bytes_sent"] < 2 * w
    assert phases["train.align"]["bytes_sent"] > 2 * w
    assert rounds[1]["server_privfusion_accuracy"] == fin["privfusion_accuracy"]
    # breast cancer: the majority class is 63.2 % of the test split (a constant predictor)
    assert fin["party_best_accuracy"] > 0.75
    # seed 0 measured: matched 0.912, PrivFusion 0.904, averaging 0.781, parties 0.38-0.82
    assert fin["matched_accuracy"] > 0.7 and fin["privfusion_accuracy"] > 0.7
    # the ensemble averages the parties' softmax outputs: not below the worst party
    worst = min(fin[f"party{p}_accuracy"] for p in range(3))
    assert fin["ensemble_accuracy"] >= worst
    assert fin["party_mean_accuracy"] == pytest.approx(
        sum(fin[f"party{p}_accuracy"] for p in range(3)) / 3
    )
    for p in range(3):  # every party spent its budget, never more
        assert 3.0 < fin[f"party{p}_epsilon"] <= 4.0 + 1e-6
    assert fin["epsilon_max"] == max(fin[f"party{p}_epsilon"] for p in range(3))
    # the fusing party (0) also spent the adapter's share, on top of its released eps_spent
    parties = res["extra"]["parties"]
    assert fin["party0_epsilon"] > parties["0"]["eps_spent"] + 0.3
    assert fin["party1_epsilon"] == parties["1"]["eps_spent"]
    assert rounds[1]["moved_neurons"] > 0 and rounds[1]["parties"] == 3
    assert all(parties[p]["noise_multiplier"] > 0 for p in parties)


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    proc = flwr_run(
        "privfusion",
        {**TINY, "epsilon": 0.0, "num-server-rounds": 1, "results-dir": str(out)},
        num_supernodes=2,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fin = json.loads((out / "results.json").read_text())["extra"]["final"]
    assert fin["privfusion_accuracy"] > 0.5
    assert math.isinf(fin["epsilon_max"])  # no privacy: epsilon = infinity is reported


def test_local_engine_run_matches_and_beats_averaging(tmp_path):
    """The runner's launcher=local path: the app's ServerApp/ClientApp code without Ray."""
    from flowerbed.simulation.local import run_local

    out = tmp_path / "local"
    run_local(
        "privfusion",
        {
            **TINY,
            "partitioner": "iid",
            "local-epochs": 20,
            "epsilon": 0.0,
            "seed": 0,
            "results-dir": str(out),
        },
        3,
    )
    res = json.loads((out / "results.json").read_text())
    fin = res["extra"]["final"]
    assert [r["round"] for r in res["rounds"]] == [0, 1]
    # no privacy, IID parties: matched fusion is a good model (seed 0: 0.974, averaging 0.640)
    assert fin["matched_accuracy"] > 0.9
    assert fin["matched_accuracy"] > fin["averaging_accuracy"]
    assert math.isinf(fin["epsilon_max"])


def test_fedavg_baseline_runs_num_server_rounds(tmp_path):
    """method=fedavg: the shared FedAvg baseline for num-server-rounds rounds (no Ray)."""
    from flowerbed.simulation.local import run_local

    out = tmp_path / "fedavg"
    cfg = {**TINY, "method": "fedavg", "num-server-rounds": 2, "results-dir": str(out)}
    run_local("privfusion", cfg, 2)
    res = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in res["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[1]["num_train_replies"] == 2 and rounds[1]["bytes_sent"] > 0
    fin = res["extra"]["final"]
    assert fin["fedavg_accuracy"] == rounds[2]["server_accuracy"]
    assert fin["fedavg_accuracy"] > rounds[0]["server_accuracy"]
