"""FedTA app: an in-process smoke run and a `flwr run` end-to-end run (tiny configs)."""

import json

import pytest
from conftest import app_path

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


def test_inprocess_smoke_fedta_and_fedavg(tmp_path):
    from flowerbed.simulation.inprocess import run_app

    finals = {}
    for method in ("fedta", "fedavg"):
        out = tmp_path / method
        run_app(
            "fedta",
            {
                **TINY,
                "method": method,
                "num-tasks": 2,
                "rounds-per-task": 1,
                "results-dir": str(out),
            },
            num_supernodes=3,
        )
        res = json.loads((out / "results.json").read_text())
        final = res["extra"]["final"]
        finals[method] = final
        assert {"acc_t1", "acc_t2", "kr_t", "kr_s", "upload_bytes_per_client_round"} <= set(final)
        assert 0.0 <= final["acc_t2"] <= 1.0 and final["kr_t"] > 0 and final["kr_s"] > 0
        assert [r["num_train_replies"] for r in res["rounds"]] == [3, 3]
        assert res["rounds"][0]["task"] == 0 and res["rounds"][1]["task"] == 1
        assert len(res["rounds"][1]["per_client"]) == 3
    # 2 classes x 16-d prototype + matched key, plus a 4 x 2 x 16 pool and 4 x 16 keys
    assert finals["fedta"]["upload_values_per_client_round"] == 4 * 2 * 16 + 4 * 16 + 2 * (16 + 16)
    assert (
        finals["fedavg"]["upload_bytes_per_client_round"]
        > 3 * finals["fedta"]["upload_bytes_per_client_round"]
    )
    assert finals["fedta"]["acc_t1"] > 0.5  # 2-4 classes seen; chance is at most 0.5


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
