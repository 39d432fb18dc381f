"""Convergence on Fashion-MNIST (slow: minutes on 2 cores): the blending scenario's ordering."""

import json

import pytest

from flowerbed.common.testing import app_path

APP = app_path("mixed-fl")


@pytest.mark.slow
def test_mixed_algorithms_fill_the_missing_classes(tmp_path):
    from flowerbed.simulation.local import run_local

    acc = {}
    for method in ("fedavg", "parallel", "1-way", "2-way"):
        out = tmp_path / method
        run_local(
            "mixed-fl",
            {"method": method, "num-server-rounds": 40, "results-dir": str(out)},
            num_supernodes=20,
        )
        acc[method] = json.loads((out / "results.json").read_text())["extra"]["final"]
    # FedAvg never sees classes 7..9: at most ~70 % on the inference distribution
    assert acc["fedavg"]["accuracy-other-classes"] < 0.05 and acc["fedavg"]["accuracy"] < 0.71
    for method in ("parallel", "1-way", "2-way"):
        assert acc[method]["accuracy-other-classes"] > 0.5, method
        assert acc[method]["accuracy"] > acc["fedavg"]["accuracy"] + 0.05, method
