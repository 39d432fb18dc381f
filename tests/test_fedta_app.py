"""FedTA app: an in-process smoke run and a `flwr run` end-to-end run (tiny configs)."""

import json

import pytest

from flowerbed.common.testing import app_path

app_path("fedta")

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


def test_inprocess_smoke_fedta(tmp_path):
    from flowerbed.simulation.inprocess import run_app

    out = tmp_path / "fedta"
    run_app(
        "fedta",
        {**TINY, "num-tasks": 2, "rounds-per-task": 1, "bgps-warmup": 0, "results-dir": str(out)},
        num_supernodes=3,
    )
    res = json.loads((out / "results.json").read_text())
    final = res["extra"]["final"]
    assert {"acc_t1", "acc_t2", "kr_t", "kr_s", "upload_bytes_per_client_round"} <= set(final)
    assert 0.0 <= final["acc_t2"] <= 1.0 and final["kr_t"] >= 0 and final["kr_s"] > 0
    assert [r["num_train_replies"] for r in res["rounds"]] == [3, 3]
    assert [r["task"] for r in res["rounds"]] == [0, 1]
    assert len(res["rounds"][1]["per_client"]) == 3
    # every client's first task has 2 classes; chance with >= 2 candidate classes is <= 0.5
    assert final["acc_t1"] > 0.5
    # the upload: a 4 x 2 x 16 prompt pool, 4 x 16 keys, 2 classes x (prototype + TA key)
    assert final["upload_values_per_client_round"] == 4 * 2 * 16 + 4 * 16 + 2 * (16 + 16)
    assert res["rounds"][0]["num_global_protos"] >= 2  # BGPS picked one per uploaded class
    assert -1.0 <= res["rounds"][0]["bgps_mean_score"] <= 1.0


@pytest.mark.e2e
def test_flwr_run_two_rounds(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    proc = flwr_run(
        "fedta",
        {**TINY, "num-tasks": 2, "rounds-per-task": 1, "results-dir": str(out)},
        num_supernodes=2,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert len(res["rounds"]) == 2 and "finished_at" in res
    assert set(res["extra"]["final"]) >= {"acc_t1", "acc_t2", "kr_t", "kr_s"}
