"""The deployment's ClientApp executor (simulation/clientapp_exec.py): every ClientApp call runs
in a process of its own, forked from a warm process or spawned fresh, and reports its timings;
the benchmark's breakdown of a deployed round adds up to the round."""

from __future__ import annotations

import json
import os

import pytest

from flowerbed.common.testing import TINY_FEDAVG
from flowerbed.common.threads import host_share
from flowerbed.simulation.bench import deploy_breakdown, parse_gpu


@pytest.mark.e2e
@pytest.mark.parametrize("start, secure", [("warm", True), ("spawn", False)])
def test_each_clientapp_call_is_its_own_process_with_timings(start, secure, tmp_path):
    from flowerbed.simulation.deploy import Deployment

    out, n = tmp_path / "res", 2
    with Deployment(
        tmp_path / "d", tls=secure, auth=secure, clientapp_exec=start, timings=True
    ) as d:
        d.start_superlink()
        for i in range(n):
            d.add_supernode(i, n)
        p = d.run("fedavg", {**TINY_FEDAVG, "num-server-rounds": 2, "results-dir": str(out)})
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        executors = {proc.pid for proc in d.procs if "clientapp_exec" in " ".join(proc.args)}
        tasks = d.task_timings()
    rec = json.loads((out / "results.json").read_text())
    assert [r["num_train_replies"] for r in rec["rounds"] if r["round"] >= 1] == [n, n]
    train = [t for t in tasks if t.get("message_type") == "train"]
    assert sorted((t["round"], t["partition_id"]) for t in train) == [
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    for t in train:
        assert t["start"] == start and t["exit_code"] == 0
        assert t["steps"] == TINY_FEDAVG["local-steps"] and t["train-time-s"] > 0
        assert t["torch-threads"] == host_share(n, len(os.sched_getaffinity(0)))
        assert t["acquired"] <= t["ready"] <= t["done"]
        assert t["call_s"] >= t["train-time-s"]
    # a fresh process for every call (Flower's isolation kept), never the executor itself
    pids = [t["pid"] for t in train]
    assert len(set(pids)) == len(pids) and not set(pids) & executors
    assert len(executors) == n


def _task(rnd, acquired, ready, done, **kw):
    base = {"round": rnd, "message_type": "train", "acquired": acquired, "ready": ready}
    return {**base, "done": done, **kw}


def test_deploy_breakdown_follows_the_last_reply_and_adds_up_to_the_round():
    rounds = [
        {"round": 0, "t_end": 100.0},
        {"round": 1, "t_end": 120.0, "eval_time_s": 1.0},
        {"round": 2, "t_end": 140.0, "eval_time_s": 2.0},
    ]
    inside = {
        "pull_input_s": 0.5,
        "pull_arrays_s": 0.25,
        "fab_install_s": 0.1,
        "app_load_s": 0.1,
        "call_s": 10.0,
        "train-time-s": 9.0,
        "push_reply_s": 0.2,
    }
    tasks = [
        _task(1, 101.0, 101.1, 118.0, **inside),  # round 1 is not a steady round
        _task(2, 121.0, 121.5, 133.0, **inside),
        _task(2, 122.0, 122.25, 136.0, **inside),  # the last reply of round 2
        {"round": 2, "message_type": "query", "acquired": 121.0, "done": 139.0},
    ]
    b = deploy_breakdown({"rounds": rounds, "tasks": tasks})
    assert b["round"] == pytest.approx(20.0)
    assert b["to the ClientApp"] == pytest.approx(2.0)
    assert b["process start"] == pytest.approx(0.25)
    assert b["task input"] == pytest.approx(0.25) and b["message arrays"] == pytest.approx(0.25)
    assert b["call, not training"] == pytest.approx(1.0) and b["training"] == pytest.approx(9.0)
    assert b["reply to ServerApp"] == pytest.approx(140.0 - 2.0 - 136.0)
    assert b["evaluation"] == pytest.approx(2.0)
    parts = sum(v for k, v in b.items() if k != "round")
    assert parts == pytest.approx(b["round"])
    assert deploy_breakdown({"rounds": rounds[:2], "tasks": tasks}) == {}


def test_gpu_sample_parsing():
    util, mem = parse_gpu("37\n63\n", "1234, 500\n1234, 20\n99, 1000\nbad line\n")
    assert util == 50.0 and mem == {1234: 520, 99: 1000}
    assert parse_gpu("", "") is None


def test_warm_torch_keeps_threads_and_starts_none():
    import torch

    from flowerbed.simulation.clientapp_exec import warm_torch

    before = (torch.get_num_threads(), len(os.listdir("/proc/self/task")))
    warm_torch()
    assert (torch.get_num_threads(), len(os.listdir("/proc/self/task"))) == before


@pytest.mark.parametrize("start,warmed", [("warm", True), ("spawn", False)])
def test_only_the_warm_executor_warms_torch_before_it_forks(start, warmed, monkeypatch):
    from flowerbed.simulation import clientapp_exec as ce

    calls = []

    class Stop(Exception):
        pass

    def no_client(*a, **k):  # the executor's first step after its warm-up
        calls.append("client")
        raise Stop

    monkeypatch.setattr(ce, "warm_torch", lambda: calls.append("warm"))
    monkeypatch.setattr(ce, "runtime_client", no_client)
    args = ce.parser().parse_args(["--runtime-api-address", "127.0.0.1:1", "--start", start])
    with pytest.raises(Stop):
        ce.serve(args)
    assert calls == (["warm", "client"] if warmed else ["client"])
