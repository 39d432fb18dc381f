"""Fault tolerance: injected client faults (exception, hang past the timeout, process exit).

Unit tests of the fault schedule and the client-side injection, and one in-process simulation in
which three of four clients fail in round 2 (one of each kind) and the run goes on, recording how
many failed and why.
"""

from __future__ import annotations

import json
import time

import pytest
from flwr.app import ConfigRecord, RecordDict

from flowerbed.common import faults
from flowerbed.common.config import ConfigError
from flowerbed.common.testing import TINY_FEDAVG, app_path, mock_reply, node_context

app_path("fedavg")
from fedavg import client_app, task  # noqa: E402

TINY = TINY_FEDAVG


def test_fault_schedule_is_a_function_of_seed_partition_round():
    a = [faults.fault_for("mixed", 0.3, 7, p, r) for p in range(20) for r in range(1, 11)]
    b = [faults.fault_for("mixed", 0.3, 7, p, r) for p in range(20) for r in range(1, 11)]
    assert a == b
    rate = sum(x is not None for x in a) / len(a)
    assert 0.2 < rate < 0.4, rate
    assert {x for x in a if x} == {"raise", "hang", "exit"}
    assert faults.fault_for("none", 1.0, 7, 0, 1) is None
    assert faults.fault_for("raise", 0.0, 7, 0, 1) is None
    assert faults.fault_for("raise", 0.0, 7, 3, 2, partitions="3", rounds="2") == "raise"
    assert faults.fault_for("raise", 1.0, 7, 3, 1, partitions="3", rounds="2") is None
    assert faults.fault_for("raise", 1.0, 7, 4, 2, partitions="3") is None


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"fault-mode": "segfault"}, "fault-mode='segfault'"),
        ({"fault-rate": 1.5}, "fault-rate=1.5"),
        ({"fault-partitions": "1,x"}, "fault-partitions='1,x'"),
        ({"round-timeout": 0.0}, "round-timeout=0.0"),
        ({"dp-delta": 1.0}, "dp-delta=1.0"),
    ],
)
def test_bad_fault_config_names_the_value(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        task.parse_config(bad)


def _ctx(cfg, pid=1):
    return node_context(pid, 3, cfg)


def _train_msg(cfg, rnd=1):
    c = task.parse_config(cfg)
    content = RecordDict(
        {"arrays": task.initial_arrays(c), "config": ConfigRecord({"server-round": rnd})}
    )
    return mock_reply(content)


def test_client_raise_and_hang_are_injected():
    cfg = {**TINY, "fault-mode": "raise", "fault-partitions": "1"}
    with pytest.raises(faults.InjectedFault, match="partition 1, round 1"):
        client_app.train(_train_msg(cfg), _ctx(cfg, pid=1))
    out = client_app.train(_train_msg(cfg), _ctx(cfg, pid=2))  # other partitions unaffected
    assert out.content["metrics"]["steps"] == 5
    cfg = {**TINY, "fault-mode": "hang", "fault-partitions": "1", "fault-hang-s": 1.0}
    t0 = time.perf_counter()
    client_app.train(_train_msg(cfg), _ctx(cfg, pid=1))
    assert time.perf_counter() - t0 >= 1.0


def test_client_exit_kills_the_process(tmp_path):
    import subprocess
    import sys

    code = (
        "from flowerbed.common.testing import app_path; "
        "app_path('fedavg'); from flowerbed.common.faults import maybe_inject; "
        "maybe_inject({'seed': 1, 'fault-mode': 'exit', 'fault-partitions': '0'}, 0, 1); "
        "print('survived')"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == faults.EXIT_CODE and "survived" not in p.stdout


def _mixed_seed() -> int:
    """A run seed for which partitions 1, 2, 3 fail in round 2 with three different faults."""
    for seed in range(1000):
        got = [faults.fault_for("mixed", 0.0, seed, p, 2, "1,2,3", "2") for p in (1, 2, 3)]
        if sorted(got) == ["exit", "hang", "raise"]:
            return seed
    raise AssertionError("no seed")


def test_simulation_survives_raise_hang_and_exit(tmp_path):
    """4 clients, 3 rounds; in round 2 partitions 1-3 fail (raise, hang, exit): only partition
    0 replies, the round still updates the model, and the failures are recorded with reasons."""
    from flowerbed.simulation.inprocess import run_app

    seed = _mixed_seed()
    out = tmp_path / "faulty"
    cfg = {
        **TINY,
        "seed": seed,
        "num-server-rounds": 3,
        "fault-mode": "mixed",
        "fault-partitions": "1,2,3",
        "fault-rounds": "2",
        "round-timeout": 45.0,
        "fault-hang-s": 50.0,
        "results-dir": str(out),
    }
    run_app("fedavg", cfg, num_supernodes=4, num_cpus=0.5, actor_max_restarts=-1)
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    r2 = rounds[2]
    assert r2["num_sampled"] == 4 and r2["num_train_replies"] == 1
    assert r2["num_failures"] == 2 and r2["num_timeouts"] == 1  # raise + exit; hang
    reasons = r2["failure_reasons"]
    assert "1 node(s): no reply within the round timeout" in reasons  # the hang
    errors = [r for r in reasons if ": error " in r]
    assert len(errors) == 2
    # the exit kills a Ray actor: its call fails with an actor error. Ray restarts the actor;
    # a call handed to it while it restarts fails with ActorUnavailableError instead of running
    # (so the 'raise' call may report that rather than the injected exception)
    assert any("Actor" in r for r in errors), errors
    assert all("InjectedFault: injected fault" in r or "Actor" in r for r in errors), errors
    assert r2["server_accuracy"] != rounds[1]["server_accuracy"]  # partition 0 still counted
    assert rounds[1]["num_train_replies"] == 4 and rounds[1].get("num_failures") == 0
    assert rec["extra"]["final"]["accuracy"] > rounds[0]["server_accuracy"]
    assert rec["extra"]["totals"]["num_failed_calls"] >= 3
