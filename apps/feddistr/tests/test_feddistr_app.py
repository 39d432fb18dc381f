"""FedDistr app runs: in-process smoke run (tiny generator) and `flwr run` end to end."""

import json
from pathlib import Path

import pytest

from flowerbed.common.testing import app_path

TINY = {
    "generator": "tiny",
    "train-size": 300,
    "test-size": 500,
    "inversion-steps": 3,
    "synthetic-per-class": 20,
    "ddim-steps": 3,
    "server-epochs": 2,
}


def test_inprocess_smoke_run_one_upload_round(tmp_path):
    from flowerbed.simulation.inprocess import run_app

    out = tmp_path / "run"
    run_app("feddistr", {**TINY, "partition": "near", "results-dir": str(out)}, num_supernodes=3)
    rec = json.loads((out / "results.json").read_text())
    final = rec["extra"]["final"]
    assert final["rounds"] == 1 and [r["round"] for r in rec["rounds"]] == [1]
    assert final["num_rejected"] == 0
    # near-disentangled: every client holds (almost) every class, so duplicates are merged
    assert final["num_uploaded"] > final["num_consolidated"] >= 10
    assert final["num_merges"] == final["num_uploaded"] - final["num_consolidated"]
    assert final["synthetic_size"] >= 10 * 19
    # one tiny upload per client: 10 x (8 + 8) float32 + labels + counts, far below a CNN
    assert 3 * 100 < final["bytes_received"] < 3 * 2500
    assert final["bytes_with_model_delivery"] > 3 * 800_000
    assert 0.0 <= final["accuracy"] <= 1.0
    assert (out / "synthetic_samples.png").stat().st_size > 1000
    hist = rec["extra"]["label_histograms"]
    assert len(hist) == 3 and sum(map(sum, hist)) == 300
    cons = rec["extra"]["consolidated"]
    assert sum(c["count"] for c in cons) == 300


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    pyproject = (Path(app_path("feddistr")) / "pyproject.toml").read_text()
    cfg = {**TINY, "partition": "disentangled", "results-dir": str(out)}
    p = flwr_run("feddistr", cfg, num_supernodes=2, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    final = rec["extra"]["final"]
    # disentangled: the two clients hold disjoint classes, nothing is merged
    assert final["num_merges"] == 0 and final["num_consolidated"] == final["num_uploaded"] >= 10
    assert final["bytes_received"] > 0 and final["rounds"] == 1
    assert (Path(app_path("feddistr")) / "pyproject.toml").read_text() == pyproject
