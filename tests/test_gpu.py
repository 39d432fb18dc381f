"""Fractional GPUs per virtual client (``resources=gpu``): Ray places the actors on the GPU and
the ClientApps train there. Skipped on machines without a CUDA GPU."""

from __future__ import annotations

import json

import pytest
import torch

from flowerbed.common.testing import TINY_FEDAVG

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fractional_gpu_actors_see_the_gpu():
    import ray

    from flowerbed.simulation.inprocess import app_dir, backend_config, start_local_ray

    start_local_ray(
        app_dir("fedavg"), backend_config(1, 0.25)["init_args"], num_actors=4, threads_per_actor=1
    )
    try:

        @ray.remote(num_cpus=0.25, num_gpus=0.25)
        class Probe:
            def state(self):
                import torch

                return ray.get_gpu_ids(), torch.cuda.is_available()

        probes = [Probe.remote() for _ in range(4)]
        for gpu_ids, available in ray.get([p.state.remote() for p in probes]):
            assert gpu_ids and available
    finally:
        ray.shutdown()


def test_simulation_with_quarter_gpus_completes(tmp_path):
    from flowerbed.simulation.inprocess import run_app

    out = tmp_path / "gpu"
    run_app(
        "fedavg",
        {**TINY_FEDAVG, "num-server-rounds": 1, "device": "cuda", "results-dir": str(out)},
        num_supernodes=4,
        num_cpus=0.5,
        num_gpus=0.25,
    )
    rec = json.loads((out / "results.json").read_text())
    row = next(r for r in rec["rounds"] if r["round"] == 1)
    assert row["num_train_replies"] == 4 and row["num_failures"] == 0
