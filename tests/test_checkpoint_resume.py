"""Checkpoint and resume: atomic checkpoint files, state round trip, and a run killed after round
k then resumed that ends with exactly (bitwise) the global model of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from flowerbed.common.checkpoint import (
    FILENAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from flowerbed.common.testing import TINY_FEDAVG
from flowerbed.simulation.deploy import stop_tree
from flowerbed.strategies.fedavg import FedAvg

REPO = Path(__file__).resolve().parent.parent
TINY = {
    **TINY_FEDAVG,
    "fraction-train": 0.75,  # seeded sampling: the sampled clients depend on (seed, round)
    "checkpoint": True,
}


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path):
    arrays = ArrayRecord(
        {
            "w": Array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)),
            "n": Array(np.array([7], dtype=np.int64)),
        }
    )
    s = FedAvg()
    s.history = {1: {"num_failures": 2, "failure_reasons": ["x"]}}
    path = save_checkpoint(tmp_path / FILENAME, 3, arrays, {"fedavg": s.state_dict()})
    rnd, back, state = load_checkpoint(path)
    assert rnd == 3 and list(back.keys()) == ["w", "n"]
    for k in arrays:
        a, b = arrays[k].numpy(), back[k].numpy()
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    t = FedAvg()
    t.load_state_dict(state["fedavg"])
    assert t.history == s.history
    # a failing write leaves the previous checkpoint intact and no temp file behind
    bad = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    with pytest.raises(TypeError):
        save_checkpoint(path, 4, bad, {"oops": object()})
    assert load_checkpoint(path)[0] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]


def test_rng_state_round_trip():
    import random

    import torch

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    st = json.loads(json.dumps(rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(st)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def _run_code(cfg: dict, n: int) -> str:
    return (
        "import flowerbed.common.testing; "
        "from flowerbed.simulation.inprocess import run_app; "
        f"run_app('fedavg', {cfg!r}, num_supernodes={n}, num_cpus=0.5)"
    )


def _final_arrays(out: Path) -> dict[str, np.ndarray]:
    _, arrays, _ = load_checkpoint(out / FILENAME)
    return {k: v.numpy() for k, v in arrays.items()}


def test_killed_run_resumes_to_the_same_model(tmp_path):
    """Uninterrupted 5-round run vs. a run SIGKILLed (whole process tree) once its checkpoint
    reached round 2, then resumed: the final global models are bitwise equal."""
    from flowerbed.simulation.inprocess import run_app

    rounds, n = 5, 4
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    # 1) the run to kill, in its own process (group)
    killed = tmp_path / "killed"
    cfg = {**TINY, "num-server-rounds": rounds, "results-dir": str(killed)}
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", _run_code(cfg, n)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    done = 0
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if (killed / FILENAME).exists():
                done = load_checkpoint(killed / FILENAME)[0]
                if done >= 2:
                    break
            time.sleep(0.05)
    finally:
        stop_tree(proc, grace=0)  # SIGKILL straight away (grace 0): a crash, not a shutdown
        log.close()
    assert 2 <= done < rounds, (done, (tmp_path / "killed.log").read_text()[-3000:])
    done = load_checkpoint(killed / FILENAME)[0]  # the file is whole after a SIGKILL
    # 2) resume it in this process
    run_app("fedavg", {**cfg, "resume": True}, num_supernodes=n, num_cpus=0.5)
    rec = json.loads((killed / "results.json").read_text())
    assert rec["extra"]["resumed_from_round"] == done
    assert [r["round"] for r in rec["rounds"]] == list(range(rounds + 1))
    # 3) the uninterrupted run
    full = tmp_path / "full"
    run_app("fedavg", {**cfg, "results-dir": str(full)}, num_supernodes=n, num_cpus=0.5)
    a, b = _final_arrays(killed), _final_arrays(full)
    assert load_checkpoint(killed / FILENAME)[0] == rounds == load_checkpoint(full / FILENAME)[0]
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    rec_full = json.loads((full / "results.json").read_text())
    assert rec["extra"]["final"]["accuracy"] == rec_full["extra"]["final"]["accuracy"]
