"""FedQual app: config and method table, client steps on mock messages (calibration, FedProx mu
from the train config, local-only), smoke runs on SJAFFE asserting on results.json, flwr run."""

import json
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, MessageType, MetricRecord, RecordDict

from flowerbed.common.testing import app_path

app_path("fedqual")

from fedqual.ldl import quality_score  # noqa: E402
from fedqual.methods import METHODS  # noqa: E402
from fedqual.task import (  # noqa: E402
    SCHEMA,
    calibration_weight,
    client_data,
    initial_arrays,
    levels_of,
    local_train,
    make_model,
    parse_config,
    partitions_of,
    predict,
    train_kwargs,
)

from flowerbed.common.config import ConfigError, check_pyproject  # noqa: E402
from flowerbed.common.data import DataError  # noqa: E402
from flowerbed.common.testing import mock_reply  # noqa: E402

LOWER = {"chebyshev", "clark", "canberra", "kl"}
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


def test_pyproject_agrees_with_the_schema():
    assert check_pyproject(app_path("fedqual"), SCHEMA) == []
    for key in ("num-server-rounds", "partitioner", "method", "device", "seed"):
        assert key in SCHEMA
    assert SCHEMA["device"].default == "auto"


def test_method_table_rows_build_their_strategies():
    from flowerbed.strategies.baselines import Centralized, FedProx, LocalOnly
    from flowerbed.strategies.fedavg import FedAvg
    from flowerbed.strategies.fedqual import FedQual

    assert METHODS.names == (
        "fedqual",
        "fedqual-nocal",
        "fedqual-noweight",
        "uniform-cal",
        "fedavg",
        "fedprox",
        "local",
        "central-clean",
        "central-noisy",
    )
    kinds = {n: METHODS[n].kind for n in METHODS}
    assert kinds["fedqual"] == "reconstruction" and kinds["fedqual-nocal"] == "ablation"
    assert {kinds[n] for n in ("fedavg", "fedprox", "local", "central-clean")} == {"baseline"}

    def build(name, **over):
        cfg = parse_config({**TINY, "method": name, **over})
        return cfg.method.strategy(cfg, evaluate_each=lambda a: {}, fit=lambda r, a: (a, {}))

    s = build("fedqual", **{"alpha-max": 0.3, "reliability-power": 1.5})
    assert type(s) is FedQual and s.use_reliability and s.alpha_max == 0.3
    assert s.reliability_power == 1.5
    nocal, noweight = build("fedqual-nocal"), build("fedqual-noweight")
    assert nocal.use_reliability and nocal.alpha_max == 0.0  # no calibration
    assert not noweight.use_reliability and noweight.alpha_max == 0.5  # no reliability weights
    assert s.uniform_alpha is None and nocal.uniform_alpha is None
    uni = build("uniform-cal", **{"uniform-alpha": 0.7, "alpha-max": 0.2})
    assert type(uni) is FedQual and uni.uniform_alpha == 0.7 and uni.use_reliability
    assert uni.alpha_max == 0.2 and METHODS["uniform-cal"].kind == "baseline"
    fedavg = build("fedavg")
    assert type(fedavg) is FedAvg and not isinstance(fedavg, FedQual)
    assert isinstance(build("fedprox", **{"proximal-mu": 0.2}), FedProx)
    assert build("fedprox", **{"proximal-mu": 0.2}).proximal_mu == 0.2
    assert isinstance(build("local"), LocalOnly)
    assert isinstance(build("central-clean"), Centralized)
    assert METHODS["central-clean"].flag("clean") and not METHODS["central-noisy"].flag("clean")
    # baselines' training metrics leave out the partition id, as FedQual's
    assert "partition-id" not in fedavg.train_metrics_aggr_fn(
        [
            RecordDict({"m": MetricRecord({"num-examples": 1, "partition-id": 0, "x": 1.0})}),
            RecordDict({"m": MetricRecord({"num-examples": 1, "partition-id": 1, "x": 3.0})}),
        ],
        "num-examples",
    )


def test_calibration_weight_from_estimated_quality():
    assert calibration_weight(0.3, 0.0, 0.5) == 0.0  # round 1: no reference yet
    assert calibration_weight(0.8, 0.8, 0.5) == 0.0  # the best client keeps its autonomy
    assert calibration_weight(0.2, 0.8, 0.5) == pytest.approx(0.375)  # .5 (1 - .2/.8)
    assert calibration_weight(0.9, 0.8, 0.5) == 0.0  # clipped
    assert calibration_weight(0.0, 0.8, 0.5) == 0.5  # the worst client: alpha_max
    assert calibration_weight(0.2, 0.8, 0.5, uniform=0.3) == 0.3  # uniform: quality ignored
    assert calibration_weight(0.8, 0.8, 0.5, uniform=0.3) == 0.3
    assert calibration_weight(0.2, 0.0, 0.5, uniform=0.3) == 0.0  # round 1: no anchor yet


def test_corrupted_clients_get_noisy_labels_and_clean_test_split():
    cfg = parse_config({**TINY, "corruption-level": 0.9, "clean-fraction": 0.4})
    levels = levels_of(cfg, 5)
    assert sum(lv == 0 for lv in levels) == 2
    for pid, lv in enumerate(levels):
        x, y, clean, level = client_data(cfg, pid, 5)
        assert level == lv and len(x) == len(y) == len(clean)
        gap = np.abs(y.numpy() - clean.numpy()).max()
        assert (gap == 0) if lv == 0 else (gap > 0.1)


def _train_msg(cfg, q_ref: float, alpha_max: float, **conf):
    config = {"server-round": 3, "q-ref": q_ref, "alpha-max": alpha_max, **conf}
    content = RecordDict({"arrays": initial_arrays(cfg), "config": ConfigRecord(config)})
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
        # q_k: the estimator on the client's own annotations vs the received model's output
        _, y, _, _ = client_data(pcfg, pid, 3)
        assert m["quality"] == pytest.approx(quality_score(y.numpy(), _anchor(pcfg, pid, 3)))
        assert m["partition-id"] == pid
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
    # the no-calibration ablation's clients do not calibrate either, whatever the config says
    ctx = Context(1, 0, {"partition-id": 0, "num-partitions": 3}, RecordDict(), cfg)
    ctx.run_config = {**cfg, "method": "fedqual-nocal"}
    assert train(_train_msg(pcfg, 1.0, 0.5), ctx).content["metrics"]["alpha"] == 0.0


def _anchor(cfg, pid, n):
    """The global anchor by hand: softmax of the initial (received) model on the client's x."""
    import torch

    from flowerbed.common.records import load_record

    x, y, _, _ = client_data(cfg, pid, n)
    model = load_record(make_model(cfg, x.shape[1], y.shape[1]), initial_arrays(cfg))
    with torch.no_grad():
        return torch.softmax(model(x), 1).double().numpy()


def test_predict_is_the_softmax_of_the_model():
    import torch

    model = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    p = predict(model, torch.tensor([[np.log(2.0), np.log(3.0)]], dtype=torch.float32), "cpu")
    np.testing.assert_allclose(p, [[2 / 6, 3 / 6, 1 / 6]], rtol=1e-6)  # e^z = (2, 3, 1)


def test_client_trains_on_the_calibrated_target():
    """alpha > 0: the local update is the one on (1 - alpha) d + alpha p_g, not on d."""
    import torch

    from flowerbed.common.client import local_sgd
    from flowerbed.common.seeding import derive_seed

    cfg = parse_config({**TINY, "corruption-level": 0.9})
    pid = next(p for p, lv in enumerate(levels_of(cfg, 3)) if lv > 0)  # a corrupted client
    x, y, _, _ = client_data(cfg, pid, 3)
    p_g = _anchor(cfg, pid, 3)
    q = quality_score(y.numpy(), p_g)
    out, m = local_train(cfg, initial_arrays(cfg), pid, 3, 3, q_ref=1.0, alpha_max=0.5)
    alpha = 0.5 * (1.0 - q)  # q_ref = 1
    assert m["alpha"] == pytest.approx(alpha) and alpha > 0.05 and m["quality"] == q

    def sgd(target):
        model = make_model(cfg, x.shape[1], y.shape[1])
        seed = derive_seed(cfg["seed"], pid, 3)
        arrays, stats = local_sgd(
            model, initial_arrays(cfg), x, target, seed, device="cpu", **train_kwargs(cfg)
        )
        return {k: v.numpy() for k, v in arrays.items()}, stats

    mixed = (1.0 - alpha) * y + alpha * torch.from_numpy(p_g).float()
    want, stats = sgd(mixed)
    raw, _ = sgd(y)
    got = {k: v.numpy() for k, v in out.items()}
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert any(not np.array_equal(got[k], raw[k]) for k in raw)
    assert m["train_loss"] == pytest.approx(stats["train_loss"])


def test_uniform_calibration_gives_every_client_the_same_alpha():
    from fedqual.client_app import train

    cfg = {**TINY, "corruption-level": 0.9, "method": "uniform-cal"}
    pcfg = parse_config(cfg)
    alphas, qualities = [], []
    for pid in range(3):
        msg = _train_msg(pcfg, 0.9, 0.5, **{"uniform-alpha": 0.3})
        m = train(msg, _ctx(cfg, pid)).content["metrics"]
        alphas.append(m["alpha"])
        qualities.append(round(m["quality"], 6))
    assert alphas == [0.3, 0.3, 0.3] and len(set(qualities)) == 3  # qualities differ
    # round 1 (no reference yet): nobody calibrates
    msg = _train_msg(pcfg, 0.0, 0.5, **{"uniform-alpha": 0.3})
    assert train(msg, _ctx(cfg, 1)).content["metrics"]["alpha"] == 0.0


def test_quality_estimator_switch_reaches_the_client():
    pcfg = parse_config({**TINY, "corruption-level": 0.9, "quality-estimator": "kl"})
    _, m = local_train(pcfg, initial_arrays(pcfg), 1, 3, 2, q_ref=0.0, alpha_max=0.5)
    _, y, _, _ = client_data(pcfg, 1, 3)
    p_g = _anchor(pcfg, 1, 3)
    assert m["quality"] == pytest.approx(quality_score(y.numpy(), p_g, "kl"))
    assert m["quality"] != pytest.approx(quality_score(y.numpy(), p_g, "corr"), abs=1e-3)
    assert m["alpha"] == 0.0  # no reference yet


def test_quality_vs_level_sign():
    from fedqual.server_app import quality_vs_level

    history = {1: {"quality": {"0": 0.1, "1": 0.9, "2": 0.5}}, 2: {}}
    # cleaner client (lower level) has the higher quality: rank correlation +1
    assert quality_vs_level(history, [0.9, 0.0, 0.45]) == {"spearman_quality_vs_clean": 1.0}
    assert quality_vs_level(history, [0.0, 0.9, 0.45])["spearman_quality_vs_clean"] == -1.0
    assert quality_vs_level(history, [0.0, 0.0, 0.0]) == {}


def _ctx(run_config, pid=0, n=3):
    return Context(1, pid, {"partition-id": pid, "num-partitions": n}, RecordDict(), run_config)


def _arrays(msg):
    return {k: v.numpy() for k, v in msg.content["arrays"].items()}


def test_fedprox_client_reads_mu_from_the_train_config():
    from fedqual.client_app import train

    cfg = {**TINY, "method": "fedprox", "proximal-mu": 5.0}  # the run config's mu is not read
    pcfg = parse_config(cfg)
    plain = _arrays(train(_train_msg(pcfg, 0.0, 0.0), _ctx(cfg)))
    same = _arrays(train(_train_msg(pcfg, 0.0, 0.0, **{"proximal-mu": 0.0}), _ctx(cfg)))
    prox = _arrays(train(_train_msg(pcfg, 0.0, 0.0, **{"proximal-mu": 5.0}), _ctx(cfg)))
    init = {k: v.numpy() for k, v in initial_arrays(pcfg).items()}
    assert all(np.array_equal(plain[k], same[k]) for k in plain)  # absent mu = 0
    # the proximal term pulls the update towards the received model
    dist = lambda a: sum(float(np.sum((a[k] - init[k]) ** 2)) for k in a)  # noqa: E731
    assert dist(prox) < dist(plain)


def test_local_only_client_continues_from_its_own_model():
    from fedqual.client_app import train

    cfg = {**TINY, "method": "local"}
    pcfg = parse_config(cfg)
    ctx = _ctx(cfg)
    first = train(_train_msg(pcfg, 0.0, 0.0, **{"local-only": True}), ctx)
    assert "local-model" in ctx.state.array_records
    kept = {k: v.numpy() for k, v in ctx.state["local-model"].items()}
    assert all(np.array_equal(kept[k], v) for k, v in _arrays(first).items())
    # the next call starts from the kept model, not from the (initial) model it receives
    second = _arrays(train(_train_msg(pcfg, 0.0, 0.0, **{"local-only": True}), ctx))
    fresh = _arrays(train(_train_msg(pcfg, 0.0, 0.0, **{"local-only": True}), _ctx(cfg)))
    assert any(not np.array_equal(second[k], fresh[k]) for k in second)
    # without local-only (FedAvg) nothing is kept
    ctx = _ctx({**TINY, "method": "fedavg"})
    train(_train_msg(pcfg, 0.0, 0.0), ctx)
    assert "local-model" not in ctx.state.array_records


def test_runner_rejects_bad_value_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "flowerbed.simulation.runner", "app=fedqual"]
    p = subprocess.run(
        [*cmd, "++run_config.corruption-level=1.5", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("flowerbed-run: error: run config corruption-level=1.5"), last


def _check_results(path, rounds):
    rec = json.loads(path.read_text())
    final = rec["extra"]["final"]
    assert set(final) == {"chebyshev", "clark", "canberra", "kl", "cosine", "intersection"}
    assert [r["round"] for r in rec["rounds"]] == list(range(rounds + 1))
    # the final model is the last round's and better than the initial one on every measure
    first, last = rec["rounds"][0], rec["rounds"][-1]
    for k in final:
        assert final[k] == last[f"server_{k}"], k
        better = final[k] < first[f"server_{k}"] if k in LOWER else final[k] > first[f"server_{k}"]
        assert better, (k, final[k], first[f"server_{k}"])
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
    # round 1 has no anchor reference, so nobody calibrates
    r1 = rec["rounds"][1]
    assert set(r1["alpha"].values()) == {0.0} and r1["q_ref"] == 0.0
    assert set(rec["extra"]["client_levels"]) == {"0", "1", "2"}
    # the recorded numbers follow the formulas: w_k = n_k q_k^2 / sum_j n_j q_j^2 (power 2),
    # q_ref = the best quality of the previous round, alpha_k = .5 clip(1 - q_k / q_ref, 0, 1)
    n = {str(p): len(ix) for p, ix in enumerate(partitions_of(parse_config(TINY), 3))}
    for r in (r1, r2):
        raw = {p: n[p] * r["quality"][p] ** 2 for p in n}
        for p in n:
            assert r["reliability_weight"][p] == pytest.approx(raw[p] / sum(raw.values()))
    assert r2["q_ref"] == pytest.approx(max(r1["quality"].values()))
    for p in n:
        want = 0.5 * min(max(1 - r2["quality"][p] / r2["q_ref"], 0.0), 1.0)
        assert r2["alpha"][p] == pytest.approx(want)
    assert max(r2["alpha"].values()) > 0  # someone calibrated
    # bytes from the protocol layer: 3 models (32 024 bytes of float32 each) each way at least
    assert r2["bytes_sent"] > 3 * 32024 and r2["bytes_received"] > 3 * 32024
    assert rec["extra"]["totals"]["bytes_sent"] == sum(
        r.get("bytes_sent", 0) for r in rec["rounds"]
    )
    # a model better than the initial one on the clean test split; final = the last round's
    assert r2["server_kl"] < rec["rounds"][0]["server_kl"]
    assert rec["extra"]["final"]["kl"] == r2["server_kl"]


def test_local_and_centralized_runs_without_ray(tmp_path):
    from flowerbed.simulation.local import run_local

    def run(method, **over):
        out = tmp_path / f"{method}-{len(over)}"
        cfg = {**TINY, "method": method, "results-dir": str(out), **over}
        run_local("fedqual", cfg, num_supernodes=3)
        return _check_results(out / "results.json", 2)

    loc = run("local")
    for r in loc["rounds"][1:]:  # every client trains; its own model is evaluated, then averaged
        assert r["num_train_replies"] == 3 and r["bytes_sent"] > 3 * 32024
        assert r["server_kl"] < loc["rounds"][0]["server_kl"]
    assert loc["extra"]["final"]["kl"] == loc["rounds"][-1]["server_kl"]
    clean, noisy = run("central-clean"), run("central-noisy")
    for rec in (clean, noisy):
        assert "train_train_loss" in rec["rounds"][1] and rec["rounds"][1]["bytes_sent"] == 0
    # the clean flag selects the clean labels: different models on corrupted data...
    assert clean["extra"]["final"]["kl"] != noisy["extra"]["final"]["kl"]
    # ...and the same model when no client is corrupted
    same = [run(m, **{"corruption-level": 0.0}) for m in ("central-clean", "central-noisy")]
    assert same[0]["extra"]["final"] == same[1]["extra"]["final"]
    # uniform calibration: every client the same alpha from round 2, none in round 1
    uni = run("uniform-cal", **{"uniform-alpha": 0.4, "corruption-level": 0.9})
    assert set(uni["rounds"][1]["alpha"].values()) == {0.0}
    assert uni["rounds"][2]["alpha"] == {"0": 0.4, "1": 0.4, "2": 0.4}


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    proc = flwr_run("fedqual", {**TINY, "results-dir": str(out)}, num_supernodes=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    _check_results(out / "results.json", 2)
