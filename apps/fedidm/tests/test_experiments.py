"""The grid command (``fedidm.experiments``): the cells of issue #15's grid, which runs count as
a finished cell, the runner commands of the missing ones, and the tables, on fake
``results.json`` files in tmp folders (no training)."""

import json
from itertools import product

import pytest

from flowerbed.common import attacks
from flowerbed.common.testing import app_path

APP = app_path("fedidm")

from fedidm import experiments as E  # noqa: E402


def _fake(folder, method, attack, fraction, seed, acc=0.7, clients=20, rounds=None, **over):
    """A finished run of the grid's setting (``over`` changes config keys or top-level ones)."""
    cfg = {**E.setting(), "method": method, "attack": attack, "seed": seed}
    cfg["attack-fraction"] = fraction
    top = {k: over.pop(k) for k in ("app", "extra", "git_commit") if k in over}
    cfg.update(over)
    rows = rounds or [
        {"round": r, "phases": {"train": {"num_sent": clients}}, "server_accuracy": acc}
        for r in range(1, 11)
    ]
    run = {
        "app": "fedidm",
        "config": cfg,
        "git_commit": "abc1234def",
        "rounds": rows,
        "extra": {"final": {"accuracy": acc, "acc_std_last10": 0.1}},
        **top,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(run))
    return run


def test_the_grid_has_every_method_attack_fraction_seed_and_shares_no_attack():
    every = E.cells()
    assert len(every) == len(set(every)) == 8 * 3 + 8 * 7 * 3 * 3  # 24 none + 504 attacked
    assert ("fedidm", "none", None, 2) in every and ("fltrust", "ipm", 0.4, 0) in every
    assert not any(a == "none" and f is not None for _, a, f, _ in every)
    assert len(E.cells((0.3,))) == 24 + 8 * 7 * 3
    assert {"none", *E.ATTACKS} == set(attacks.ATTACKS) and len(E.METHODS) == 8
    assert E.setting()["num-server-rounds"] == 10 and E.setting()["alpha"] == 0.5
    assert E.setting()["dataset"] == "fashion_mnist" and "method" not in E.setting()


def test_finished_runs_are_kept_and_other_settings_are_not(tmp_path):
    _fake(tmp_path / "a/0", "fedidm", "sign-flip", 0.3, 0)
    _fake(tmp_path / "a/1", "fedidm", "none", 0.4, 1)  # no attack: any fraction
    _fake(tmp_path / "a/2", "fedavg", "lie", 0.3, 2, finetune=False)  # FedAvg never reads it
    # not grid cells: another alpha, rounds, size, method key, app; an unfinished run
    _fake(tmp_path / "b/0", "fedidm", "lie", 0.3, 0, alpha=0.1)
    _fake(tmp_path / "b/1", "fedidm", "lie", 0.3, 1, **{"num-server-rounds": 8})
    _fake(tmp_path / "b/2", "fedidm", "lie", 0.3, 2, clients=10)
    _fake(tmp_path / "b/3", "fedidm", "gaussian", 0.3, 0, finetune=False)  # FedIDM reads it
    _fake(tmp_path / "b/4", "fedidm", "ipm", 0.3, 0, app="fedavg")
    _fake(tmp_path / "b/5", "fedidm", "ipm", 0.3, 1, extra={"final": {}})
    found, twice = E.find([tmp_path])
    assert set(found) == {
        ("fedidm", "sign-flip", 0.3, 0),
        ("fedidm", "none", None, 1),
        ("fedavg", "lie", 0.3, 2),
    }
    assert twice == []
    missing, cmds = E.plan(found, tmp_path / "out")
    assert len(missing) == len(E.cells()) - 3 and not set(found) & set(missing)
    # a key the run does not record counts as its default (runs made before the key existed)
    run = _fake(tmp_path / "c/0", "krum", "ipm", 0.2, 0)
    del run["config"]["unparticipating-fraction"]
    (tmp_path / "c/0/results.json").write_text(json.dumps(run))
    _fake(tmp_path / "c/1", "krum", "ipm", 0.2, 0, acc=0.5)  # the same cell again: later path
    found, twice = E.find([tmp_path])
    assert (
        twice == [("krum", "ipm", 0.2, 0)] and found[twice[0]]["extra"]["final"]["accuracy"] == 0.5
    )


def _expand(cmd):
    """The (method, attack, fraction, seed) cells one runner command makes."""
    arg = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in cmd if "=" in a}
    methods = arg["++run_config.method"].split(",")
    attacks = arg["++run_config.attack"].split(",")
    frac = float(arg["++run_config.attack-fraction"])
    seed = int(arg["seed"])
    return {(m, a, None if a == "none" else frac, seed) for m, a in product(methods, attacks)}


@pytest.mark.parametrize("budget", [60.0, 480.0, 5000.0])
def test_the_commands_make_exactly_the_missing_cells_within_the_budget(tmp_path, budget):
    found = {c: {} for c in E.cells((0.2,), seeds=(0,))}  # 20 % seed 0 done
    found.pop(("fedidm", "lie", 0.2, 0))
    missing, cmds = E.plan(found, tmp_path, budget=budget)
    made = [_expand(c) for c in cmds]
    assert set().union(*made) == set(missing) and sum(map(len, made)) == len(missing)
    for cmd, cells in zip(cmds, made, strict=True):
        assert " -m app=fedidm launcher=local " in " ".join(cmd)
        assert "++run_config.num-server-rounds=10" in cmd and "++run_config.alpha=0.5" in cmd
        if len(cells) > 1:  # one run over the budget is a group of its own
            assert sum(E.seconds(m) for m, *_ in cells) <= budget
        assert len({E.seconds(m) for m, *_ in cells}) == 1  # FedIDM never with baselines
        sweep = next(a for a in cmd if a.startswith("hydra.sweep.dir="))
        assert sweep.startswith(f"hydra.sweep.dir={tmp_path / 'fedidm_exp'}")
    assert len({a for c in cmds for a in c if a.startswith("hydra.sweep.dir=")}) == len(cmds)


def test_filters_select_fraction_method_attack_seed(tmp_path):
    missing, _ = E.plan({}, tmp_path, (0.4,), ("fedidm",), ("sign-flip", "ipm"), (1, 2))
    assert sorted(missing) == sorted(
        ("fedidm", a, 0.4, s) for a in ("sign-flip", "ipm") for s in (1, 2)
    )
    with pytest.raises(SystemExit, match="--only: unknown value 50"):
        E.main(["--only", "50", "--dry-run", "--out", str(tmp_path)])


def test_dry_run_lists_and_runs_nothing(tmp_path, capsys):
    _fake(tmp_path / "r/0", "fedavg", "none", 0.3, 0)
    E.main(["--dry-run", "--out", str(tmp_path), "--only", "30", "--methods", "fedavg"])
    out = capsys.readouterr().out
    assert "24 cells selected, 1 found, 23 to run" in out and "would run" in out
    assert not (tmp_path / "fedidm_exp").exists()


def test_gap_and_detection_tables_by_hand(tmp_path):
    for s, (clean, hit) in enumerate([(0.70, 0.66), (0.60, 0.59), (0.80, 0.82)]):
        _fake(tmp_path / f"n{s}", "fedidm", "none", 0.3, s, acc=clean)
        rows = [  # attackers {1, 2}; round 1 rejects 1 and benign 3, round 2 rejects 2
            {"round": 1, "phases": {"train": {"num_sent": 20}}, "num_train_replies": 20,
             "malicious_nodes": [1, 2], "rejected_nodes": [1, 3]},
            {"round": 2, "phases": {"train": {"num_sent": 20}}, "num_train_replies": 20,
             "malicious_nodes": [1, 2], "rejected_nodes": [2]},
        ]  # fmt: skip
        run = _fake(tmp_path / f"a{s}", "fedidm", "sign-flip", 0.3, s, acc=hit, rounds=rows)
        run["extra"]["final"].update(detect_precision=0.75, detect_recall=0.5)
        (tmp_path / f"a{s}/results.json").write_text(json.dumps(run))
    found, _ = E.find([tmp_path])
    gap = "\n".join(E.gap_table(found, 0.3, ("fedidm",)))
    # gaps -4.0 / -1.0 / +2.0 points, mean -1.0; mean 0.69, sample std 0.115758...
    assert "| fedidm | sign-flip | 0.6600 | 0.5900 | 0.8200 | 0.6900 ± 0.1179 |" in gap
    assert "**-4.0** / -1.0 / +2.0 | -1.0 |" in gap
    assert "| fedidm | none | 0.7000 | 0.6000 | 0.8000 | 0.7000 ± 0.1000 | | |" in gap
    det = "\n".join(E.detection_table(found))
    # per seed tp 2, fp 1, fn 2 over 2 rounds (36 benign updates): pooled 6 / 3 / 6
    assert "| fedidm | 30% | sign-flip | 0.7500 ± 0.0000 | 0.5000 ± 0.0000 | 0.667 | 0.500 |" in det
    assert "| 6 / 3 / 6 | 0.028 | 0,1,2 |" in det
    metrics = "\n".join(E.metrics_table(found, 0.3))
    assert "| fedidm | sign-flip | 0.6900 ± 0.1179 | 0.1000 ± 0.0000 |" in metrics
    assert "| fedavg | none | – | – | – | – | 0 |" in metrics
    matrix = "\n".join(E.matrix_table(found, 0.3))
    assert "| fedidm | 0.700 | 0.690 (-1.0) | – |" in matrix


def test_reports_are_written_per_fraction(tmp_path):
    _fake(tmp_path / "runs/0", "fedavg", "none", 0.3, 0, acc=0.7)
    _fake(tmp_path / "runs/1", "fedavg", "gaussian", 0.2, 0, acc=0.4)
    found, _ = E.find([tmp_path / "runs"])
    files = E.write_reports(found, tmp_path / "res", (0.2,))
    assert sorted(p.name for p in files) == ["detection.md", "grid_20pct.md", "grid_20pct.png"]
    text = (tmp_path / "res/grid_20pct.md").read_text()
    assert text.startswith("# 20 % malicious: 2 of 192 cells x seeds found")
    assert (
        "| fedavg | gaussian | 0.4000 | – | – | 0.4000 ± 0.0000 | **-30.0** | **-30.0** |" in text
    )
