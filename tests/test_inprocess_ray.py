"""run_app's own Ray start: ClientApp preloaded in the workers, with the actors' thread count."""

import os
import sys

import pytest

ray = pytest.importorskip("ray")


def test_preloaded_workers_use_the_actor_cpus_as_torch_threads():
    from flowerbed.simulation.inprocess import app_dir, backend_config, start_local_ray

    assert not ray.is_initialized()
    before = os.environ.get("OMP_NUM_THREADS")
    start_local_ray(
        app_dir("fedavg"), backend_config(1)["init_args"], num_actors=2, threads_per_actor=1
    )
    try:
        assert os.environ.get("OMP_NUM_THREADS") == before  # this process keeps its setting

        @ray.remote(num_cpus=1)
        class Probe:
            def state(self):
                import torch

                return "fedavg.client_app" in sys.modules, torch.get_num_threads()

        preloaded, threads = ray.get(Probe.remote().state.remote())
        # torch was imported by the preload, before Ray assigned the actor: without the
        # inherited OMP_NUM_THREADS it would use every core and oversubscribe the machine
        assert preloaded and threads == 1
        nodes = ray.nodes()
        assert len(nodes) == 1 and nodes[0]["Alive"]
    finally:
        ray.shutdown()
