"""``launcher=local`` gives exactly Flower's engine's result: the same seed and clients give
the same final global model, bitwise, with ``run_local`` (one process, no Ray) and ``run_app``
(ServerApp thread + Ray actors).

Fashion-MNIST with an MLP on 784 inputs is included because there the torch thread count
changes the last bits of the matrix products (one thread per actor of one CPU, two in this
process on a two-core machine): ``run_local`` must train with the actors' thread count.
"""

from __future__ import annotations

import json

import pytest

from flowerbed.common.checkpoint import FILENAME, load_checkpoint
from flowerbed.common.testing import TINY_FEDAVG

CASES = {
    "digits": TINY_FEDAVG,
    "fashion_mnist": {**TINY_FEDAVG, "dataset": "fashion_mnist"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_local_launcher_equals_flowers_engine_bitwise(case, tmp_path):
    from flowerbed.simulation.inprocess import run_app
    from flowerbed.simulation.local import run_local

    cfg = {
        **CASES[case],
        "num-server-rounds": 2,
        "fraction-train": 0.75,  # seeded sampling of 3 of 4 clients per round
        "checkpoint": True,  # the final global model is saved with dtype and shape
        "seed": 7,
    }
    run_local("fedavg", {**cfg, "results-dir": str(tmp_path / "local")}, 4, num_cpus=1)
    run_app("fedavg", {**cfg, "results-dir": str(tmp_path / "engine")}, 4, num_cpus=1)

    rnd_a, a, _ = load_checkpoint(tmp_path / "local" / FILENAME)
    rnd_b, b, _ = load_checkpoint(tmp_path / "engine" / FILENAME)
    assert rnd_a == rnd_b == 2 and list(a.keys()) == list(b.keys())
    for key in a:
        x, y = a[key].numpy(), b[key].numpy()
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), f"{key}: max |diff| {abs(x - y).max()}"

    rows = [
        {r["round"]: r for r in json.loads((tmp_path / d / "results.json").read_text())["rounds"]}
        for d in ("local", "engine")
    ]
    for rnd in (1, 2):
        for key in ("server_loss", "server_accuracy", "train_train_loss", "num_train_replies"):
            assert rows[0][rnd][key] == rows[1][rnd][key], (rnd, key)


def test_fedqual_local_equals_engine(tmp_path):
    """The FedQual tables are made with ``launcher=local``: the same final measures, exactly."""
    from flowerbed.common.data import available
    from flowerbed.simulation.inprocess import run_app
    from flowerbed.simulation.local import run_local

    if "ldl/SBU_3DFE" not in available():
        pytest.skip("LDL data (ldl/SBU_3DFE) not present")
    cfg = {"dataset": "ldl/SBU_3DFE", "num-server-rounds": 3, "corruption-level": 0.9, "seed": 0}
    run_local("fedqual", {**cfg, "results-dir": str(tmp_path / "local")}, 5, num_cpus=1)
    run_app("fedqual", {**cfg, "results-dir": str(tmp_path / "engine")}, 5, num_cpus=1)
    recs = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("local", "engine")]
    assert recs[0]["extra"]["final"] and recs[0]["extra"]["final"] == recs[1]["extra"]["final"]
    assert [r.get("server_kl") for r in recs[0]["rounds"]] == [
        r.get("server_kl") for r in recs[1]["rounds"]
    ]
