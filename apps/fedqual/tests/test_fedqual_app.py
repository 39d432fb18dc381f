"""FedQual app: config errors, client calibration with a mock message, smoke and e2e runs."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

from flowerbed.common.testing import app_path

app_path("fedqual")

from fedqual.task import (  # noqa: E402
    calibration_weight,
    client_data,
    initial_arrays,
    levels_of,
    parse_config,
    partitions_of,
)

from flowerbed.common.config import ConfigError  # noqa: E402
from flowerbed.common.data import DataError  # noqa: E402
from flowerbed.common.testing import mock_reply  # noqa: E402

TINY = {"dataset": "ldl/SJAFFE", "hidden": 32, "local-epochs": 1, "num-server-rounds": 2}


def test_bad_config_is_one_clear_line():
    with pytest.raises(ConfigError, match="method='fedmagic'") as e:
        parse_config({"method": "fedmagic"})
    assert "\n" not in str(e.value) and "fedqual" in str(e.value)
    with pytest.raises(ConfigError, match="corruption-level=1.5"):
        parse_config({"corruption-level": 1.5})
    with pytest.raises(DataError, match="ldl/NOPE"):
        parse_config({"dataset": "ldl/NOPE"})
    with pytest.raises(DataError, match="not a label-distribution set"):
        parse_config({"dataset": "digits"})
    cfg = parse_config(TINY)
    with pytest.raises(DataError, match="num-partitions=500 is larger than the data") as e:
        partitions_of(cfg, 500)
    assert "\n" not in str(e.value)


def test_calibration_weight_from_estimated_quality():
    assert calibration_weight(0.3, 0.0, 0.5) == 0.0  # round 1: no reference yet
    assert calibration_weight(0.8, 0.8, 0.5) == 0.0  # the best client keeps its autonomy
    assert calibration_weight(0.2, 0.8, 0.5) == pytest.approx(0.375)  # .5 (1 - .2/.8)
    assert calibration_weight(0.9, 0.8, 0.5) == 0.0  # clipped


def test_corrupted_clients_get_noisy_labels_and_clean_test_split():
    cfg = parse_config({**TINY, "corruption-level": 0.9, "clean-fraction": 0.4})
    levels = levels_of(cfg, 5)
    assert sum(lv == 0 for lv in levels) == 2
    for pid, lv in enumerate(levels):
        x, y, clean, level = client_data(cfg, pid, 5)
        assert level == lv and len(x) == len(y) == len(clean)
        gap = np.abs(y.numpy() - clean.numpy()).max()
        assert (gap == 0) if lv == 0 else (gap > 0.1)


def _train_msg(cfg, q_ref: float, alpha_max: float):
    content = RecordDict(
        {
            "arrays": initial_arrays(cfg),
            "config": ConfigRecord({"server-round": 3, "q-ref": q_ref, "alpha-max": alpha_max}),
        }
    )
    return mock_reply(content, node_id=0, message_type=MessageType.TRAIN)


def test_client_calibrates_by_its_own_quality_estimate():
    from fedqual.client_app import train

    cfg = {**TINY, "corruption-level": 0.9}
    pcfg = parse_config(cfg)
    levels = levels_of(pcfg, 3)
    out = {}
    for pid in range(3):
        ctx = Context(
            run_id=1,
            node_id=pid,
            node_config={"partition-id": pid, "num-partitions": 3},
            state=RecordDict(),
            run_config=cfg,
        )
        rep = train(_train_msg(pcfg, q_ref=1.0, alpha_max=0.5), ctx)
        m = rep.content["metrics"]
        assert 0 <= m["quality"] <= 1 and m["partition-id"] == pid
        assert m["alpha"] == pytest.approx(0.5 * (1 - m["quality"]))  # q_ref = 1
        out[pid] = m
    # with the server reference 0 the clients do not calibrate at all
    ctx = Context(1, 0, {"partition-id": 0, "num-partitions": 3}, RecordDict(), cfg)
    assert train(_train_msg(pcfg, 0.0, 0.5), ctx).content["metrics"]["alpha"] == 0.0
    # FedAvg clients never calibrate
    ctx = Context(1, 0, {"partition-id": 0, "num-partitions": 3}, RecordDict(), cfg)
    fedavg = {**cfg, "method": "fedavg"}
    ctx.run_config = fedavg
    assert train(_train_msg(pcfg, 1.0, 0.5), ctx).content["metrics"]["alpha"] == 0.0
    assert len(set(levels)) > 1 and len({round(m["alpha"], 6) for m in out.values()}) == 3


def _check_results(path, rounds):
    rec = json.loads(path.read_text())
    final = rec["extra"]["final"]
    assert set(final) == {"chebyshev", "clark", "canberra", "kl", "cosine", "intersection"}
    assert 0 < final["kl"] < 1 and 0.5 < final["cosine"] <= 1
    assert [r["round"] for r in rec["rounds"]] == list(range(rounds + 1))
    return rec


def test_inprocess_smoke_fedqual(tmp_path):
    from flowerbed.simulation.inprocess import run_app

    out = tmp_path / "smoke"
    run_app("fedqual", {**TINY, "results-dir": str(out)}, num_supernodes=3, num_cpus=2)
    rec = _check_results(out / "results.json", 2)
    r2 = rec["rounds"][-1]
    assert r2["num_train_replies"] == 3 and r2["bytes_sent"] > 0 and r2["bytes_received"] > 0
    w = r2["reliability_weight"]
    assert set(w) == {"0", "1", "2"} and sum(w.values()) == pytest.approx(1.0)
    assert set(r2["quality"]) == {"0", "1", "2"} and r2["q_ref"] > 0
    # round 1 has no anchor reference, so nobody calibrates; the weights follow n_k q_k^2
    assert set(rec["rounds"][1]["alpha"].values()) == {0.0}
    assert set(rec["extra"]["client_levels"]) == {"0", "1", "2"}
    # a model better than the initial one on the clean test split
    assert rec["rounds"][-1]["server_kl"] < rec["rounds"][0]["server_kl"]


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    proc = flwr_run("fedqual", {**TINY, "results-dir": str(out)}, num_supernodes=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    _check_results(out / "results.json", 2)
