"""Loopback deployment: TLS + SuperNode authentication refuse unregistered SuperNodes; the one
deployment command runs the FedAvg app (with injected client faults) to completion, and stops
every process it started, also on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flowerbed.common import faults
from flowerbed.simulation.deploy import Deployment

REPO = Path(__file__).resolve().parent.parent


def _left_in(workdir: Path) -> list[str]:
    """Processes still running with ``workdir`` as cwd or in their command line."""
    out = []
    w = str(workdir.resolve())
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if (p.info["cwd"] or "").startswith(w) or w in cmd:
                out.append(f"{p.pid} {cmd[:120]}")
        except psutil.Error:
            pass
    return out


def test_unauthenticated_supernode_is_refused(tmp_path):
    with Deployment(tmp_path / "d") as d:
        d.start_superlink()
        ok = d.add_supernode(0, 3)  # key registered with `flwr supernode register`
        unregistered = d.add_supernode(1, 3, register=False)  # a key the SuperLink never saw
        keyless = d.add_supernode(2, 3, key=False)  # no key at all
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and None in (unregistered.poll(), keyless.poll()):
            time.sleep(0.5)
        # both exit with an error (Flower's exit code 305: no connection to the SuperLink)
        assert unregistered.returncode not in (None, 0), d.log_text("supernode-1")[-2000:]
        assert keyless.returncode not in (None, 0), d.log_text("supernode-2")[-2000:]
        for name, why in (
            ("supernode-1", "[code: 2004] Failed to activate SuperNode"),
            ("supernode-2", "[code: 2001] SuperNode authentication is enabled"),
        ):
            assert "Exit Code: 305" in d.log_text(name) and why in d.log_text(name)
        assert ok.poll() is None  # the registered one keeps running
        assert len(d.node_ids()) == 1
        assert "SuperNode ID" in d.log_text("supernode-0")
    assert _left_in(tmp_path / "d") == []


def _seed_raise_and_exit() -> int:
    """Seed for which, in round 2, partition 1 and 2 fail with 'raise' and 'exit'."""
    for seed in range(1000):
        got = {faults.fault_for("mixed", 0.0, seed, p, 2, "1,2", "2") for p in (1, 2)}
        if got == {"raise", "exit"}:
            return seed
    raise AssertionError


@pytest.mark.e2e
def test_deploy_command_runs_fedavg_through_client_faults(tmp_path):
    workdir, out = tmp_path / "deploy", tmp_path / "results"
    rc = (
        f'num-server-rounds=3 dataset="digits" model="mlp" partitioner="iid" local-steps=5 '
        f'batch-size=32 seed={_seed_raise_and_exit()} fault-mode="mixed" fault-partitions="1,2" '
        f'fault-rounds="2" round-timeout=300.0 results-dir="{out}"'
    )
    cmd = [sys.executable, "-m", "flowerbed.simulation.deploy", "--workdir", str(workdir)]
    p = subprocess.run(
        [*cmd, "--num-supernodes", "3", "--run-config", rc],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=REPO,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "TLS, SuperNode auth: True" in p.stdout
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    assert rounds[1]["num_train_replies"] == 3
    r2 = rounds[2]
    assert r2["num_train_replies"] == 1
    assert r2["num_failures"] + r2["num_timeouts"] == 2
    assert any("InjectedFault" in r for r in r2["failure_reasons"]), r2["failure_reasons"]
    assert rounds[3]["num_train_replies"] == 3  # the SuperNode of the dead ClientApp is back
    assert rec["extra"]["final"]["accuracy"] > rounds[0]["server_accuracy"]
    time.sleep(1)
    assert _left_in(workdir) == []


@pytest.mark.e2e
def test_deploy_command_ctrl_c_stops_everything(tmp_path):
    workdir = tmp_path / "deploy"
    rc = 'num-server-rounds=500 dataset="digits" model="mlp" partitioner="iid" local-steps=5'
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowerbed.simulation.deploy", "--workdir", str(workdir)]
        + ["--num-supernodes", "2", "--run-config", rc],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "SuperNodes started" in line:
                break
        time.sleep(5)  # flwr run submitting / running
        assert len(_left_in(workdir)) >= 3, lines  # SuperLink + 2 SuperNodes (+ children)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted: stopping every process" in rest
    time.sleep(1)
    assert _left_in(workdir) == []
