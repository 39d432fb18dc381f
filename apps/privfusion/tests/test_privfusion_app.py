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
    assert [r["step"] for r in res["rounds"]] == ["local", "align", "fuse"]
    for key in (
        "privfusion_accuracy",
        "matched_accuracy",
        "averaging_accuracy",
        "ensemble_accuracy",
    ):
        assert 0.0 <= fin[key] <= 1.0
    assert fin["party_best_accuracy"] > 0.75  # breast cancer: 63% majority class
    for p in range(3):  # every party spent its budget, never more
        assert 3.0 < fin[f"party{p}_epsilon"] <= 4.0 + 1e-6
    assert fin["bytes_sent"] > 0 and fin["bytes_received"] > 0
    # step 2 moves only the non-reference parties' models
    assert res["rounds"][1]["bytes_received"] > 0
    assert res["rounds"][1]["moved_neurons"] > 0
    parties = res["extra"]["parties"]
    assert all(parties[p]["noise_multiplier"] > 0 for p in parties)


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    proc = flwr_run(
        "privfusion",
        {**TINY, "epsilon": 0.0, "results-dir": str(out)},
        num_supernodes=2,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fin = json.loads((out / "results.json").read_text())["extra"]["final"]
    assert fin["privfusion_accuracy"] > 0.5
    assert math.isinf(fin["epsilon_max"])  # no privacy: epsilon = infinity is reported


def test_local_engine_run_matches_and_beats_averaging(tmp_path):
    """The sweep's in-process LocalGrid path: the app's ServerApp/ClientApp code without Ray."""
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
    assert [r["step"] for r in res["rounds"]] == ["local", "align", "fuse"]
    # no privacy, IID parties: matched fusion is a good model (seed 0: 0.974, averaging 0.640)
    assert fin["matched_accuracy"] > 0.9
    assert fin["matched_accuracy"] > fin["averaging_accuracy"]
    assert math.isinf(fin["epsilon_max"])
