"""Torch threads per ClientApp (common/threads.py): the resolution order, and the thread count
read inside a FedAvg ClientApp call in Flower's simulation (Ray actors) and in a deployment."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
from flwr.app import Context, RecordDict

from flowerbed.common import threads as T
from flowerbed.common.testing import TINY_FEDAVG, app_path


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv(T.ENV_VAR, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _ctx(**node_config) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_host_share_divides_the_cores_and_never_gives_zero():
    assert T.host_share(3, cpus=2) == 1
    assert T.host_share(2, cpus=8) == 4
    assert T.host_share(3, cpus=8) == 2
    assert T.host_share(1, cpus=16) == 16
    with pytest.raises(ValueError, match="num_processes=0"):
        T.host_share(0)


def test_node_config_then_environment_then_nothing(monkeypatch, restore_threads):
    assert T.threads_for({"partition-id": 0}) is None  # no setting, no Ray: torch's own
    monkeypatch.setenv(T.ENV_VAR, "3")
    assert T.threads_for({"partition-id": 0}) == 3
    assert T.threads_for({"torch-threads": 2}) == 2  # node config wins over the environment
    assert T.threads_for({"torch-threads": "1"}) == 1  # --node-config may give a string


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5])
def test_bad_thread_setting_names_the_value(bad, monkeypatch, restore_threads):
    with pytest.raises(ValueError, match="torch-threads"):
        T.threads_for({"torch-threads": bad})
    monkeypatch.setenv(T.ENV_VAR, str(bad))
    with pytest.raises(ValueError, match=T.ENV_VAR):
        T.threads_for({})


def test_fit_threads_sets_torch(monkeypatch, restore_threads):
    torch.set_num_threads(2)
    assert T.fit_threads(_ctx(**{"torch-threads": 1})) == 1
    assert torch.get_num_threads() == 1
    monkeypatch.setenv(T.ENV_VAR, "2")
    assert T.fit_threads(_ctx()) == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv(T.ENV_VAR)
    torch.set_num_threads(1)
    assert T.fit_threads(_ctx()) == 1  # nothing set: left as it is


def test_ray_actor_cpus_are_read_only_inside_a_worker(monkeypatch, restore_threads):
    class Ctx:
        def __init__(self, actor):
            self.actor = actor

        def get_actor_id(self):
            return self.actor

        def get_task_id(self):
            return None

        def get_assigned_resources(self):
            return {"CPU": 0.5 if self.actor == "small" else 3.0}

    for actor, want in (("small", 1), ("big", 3), (None, None)):
        fake = types.SimpleNamespace(
            is_initialized=lambda: True, get_runtime_context=lambda a=actor: Ctx(a)
        )
        monkeypatch.setitem(sys.modules, "ray", fake)
        assert T.threads_for({}) == want  # floor(cpus), at least 1; the driver: None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores for a 2-CPU actor")
def test_fit_threads_in_real_ray_actors_follows_their_cpus():
    """Workers preloaded with OMP_NUM_THREADS=1 still train with their actor's 2 CPUs."""
    ray = pytest.importorskip("ray")
    from flowerbed.simulation.inprocess import app_dir, backend_config, start_local_ray

    start_local_ray(
        app_dir("fedavg"), backend_config(1)["init_args"], num_actors=2, threads_per_actor=1
    )
    try:

        @ray.remote
        class Probe:
            def threads(self):
                from flowerbed.common.threads import fit_threads

                return fit_threads(None)

        for cpus, want in ((0.5, 1), (1, 1), (2, 2)):
            probe = Probe.options(num_cpus=cpus).remote()
            assert ray.get(probe.threads.remote()) == want, cpus
            ray.kill(probe)
        assert T.ray_actor_cpus() is None  # the driver is not an actor
    finally:
        ray.shutdown()


def _train_threads(results: str) -> tuple[float, int]:
    rec = json.loads(open(results).read())
    rows = [r for r in rec["rounds"] if r["round"] >= 1]
    assert rows and all("train_torch-threads" in r for r in rows), rows
    return rows[-1]["train_torch-threads"], rows[-1]["num_train_replies"]


def test_threads_inside_a_simulated_clientapp_follow_the_actor_cpus(tmp_path):
    """Two actors of one CPU each: every ClientApp call trains with one torch thread."""
    from flowerbed.simulation.inprocess import run_app

    app_path("fedavg")
    out = tmp_path / "sim"
    run_app(
        "fedavg",
        {**TINY_FEDAVG, "num-server-rounds": 1, "results-dir": str(out)},
        num_supernodes=2,
        num_cpus=1,
    )
    threads, replies = _train_threads(out / "results.json")
    assert replies == 2 and threads == 1


@pytest.mark.e2e
def test_threads_inside_a_deployed_clientapp_are_the_host_share(tmp_path):
    """Three SuperNodes started by the deployment script: cores // 3 threads each (>= 1)."""
    from flowerbed.simulation.deploy import Deployment

    out = tmp_path / "res"
    n = 3
    with Deployment(tmp_path / "d", tls=False, auth=False) as d:
        d.start_superlink()
        for i in range(n):
            d.add_supernode(i, n)
        p = d.run("fedavg", {**TINY_FEDAVG, "num-server-rounds": 1, "results-dir": str(out)})
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    threads, replies = _train_threads(out / "results.json")
    assert replies == n
    assert threads == T.host_share(n, len(os.sched_getaffinity(0)))
