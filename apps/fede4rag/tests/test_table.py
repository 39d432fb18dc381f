"""The README table command (`fede4rag.table`): cells, reuse of finished runs, and the row
numbers on hand-made results files; one tiny run of a plain and a CKKS cell."""

import json

import pytest

from flowerbed.common.testing import app_path

APP = app_path("fede4rag")

from fede4rag import table  # noqa: E402


def test_parse_cell():
    assert table.parse_cell("fede4rag") == {"method": "fede4rag", "he": False}
    assert table.parse_cell("fedavg-infonce+he") == {"method": "fedavg-infonce", "he": True}
    assert table.parse_cell("fede4rag:lambda=0,lr=1e-3") == {
        "method": "fede4rag",
        "he": False,
        "lambda": "0",
        "lr": "1e-3",
    }
    with pytest.raises(ValueError, match="only '\\+he'"):
        table.parse_cell("fede4rag+dp")
    with pytest.raises(ValueError, match="not key=value"):
        table.parse_cell("fede4rag:lambda")


def _record(seed, mrr, rounds, **final):
    return {
        "config": {"seed": seed},
        "git_commit": "abcdef123",
        "rounds": [{"round": 0, "round_time_s": 99.0, "bytes_sent": 0}, *rounds],
        "extra": {"final": {"hit@1": 0.5, "mrr": mrr, **final}},
    }


def test_row_numbers_by_hand():
    r = lambda t, s, rec, **kw: {  # noqa: E731
        "round": t,
        "round_time_s": float(t),
        "bytes_sent": s,
        "bytes_received": rec,
        **kw,
    }
    he = [
        _record(0, 0.6, [r(1, 10, 20, **{"server_he-max-abs-err": 1e-8}), r(2, 30, 40)]),
        _record(1, 0.8, [r(1, 50, 60, **{"server_he-max-abs-err": 3e-8}), r(3, 70, 80)]),
    ]
    plain = [_record(0, 0.6, []), _record(1, 0.75, [])]
    row = table.summarize(he, plain)
    assert row["mrr"] == pytest.approx((0.7, 0.1414213562), abs=1e-9)  # sample std
    assert row["sent"] == (40.0, 10, 70) and row["received"] == (50.0, 20, 80)  # not round 0
    assert table._mb((35.5e6, 35.5e6, 35.5e6)) == "35.5"
    assert table._mb((635e6, 35.5e6, 862.9e6)) == "635.0 (35.5-862.9)"
    assert row["time"] == (1.75, 1.0, 3.0)  # rounds 1, 2, 1, 3
    assert row["he-err"] == 3e-8  # the largest over rounds and seeds
    assert row["vs-plain"] == pytest.approx(0.05)  # seed 1: 0.8 vs 0.75
    assert row["mrr-per-seed"] == [0.6, 0.8] and row["commits"] == ["abcdef1"]
    rows = {"local": {"mrr": (0.5, 0)}, "fedavg-infonce": {"mrr": (0.6, 0)}}
    assert "not all" in table.ordering(rows)
    rows["fede4rag"] = {"mrr": (0.55, 0)}
    assert "does NOT hold" in table.ordering(rows)
    rows["fede4rag"] = {"mrr": (0.65, 0)}
    assert ": holds" in table.ordering(rows)


TINY = {"model": "tiny", "max-docs": 300, "local-steps": 2, "lr": 0.01}


def test_cells_run_once_and_are_read_back(tmp_path, monkeypatch):
    import flowerbed.simulation.local as local

    calls = []
    real = local.run_local

    def counting(app, over, num_supernodes):
        calls.append(over["method"])
        return real(app, over, num_supernodes=num_supernodes)

    monkeypatch.setattr(local, "run_local", counting)
    setting = {**table.SETTING, **TINY, "num-server-rounds": 1}
    he = table.run_cell("fede4rag+he", 3, tmp_path, setting, num_supernodes=2)
    plain = table.run_cell("fede4rag", 3, tmp_path, setting, num_supernodes=2)
    assert calls == ["fede4rag", "fede4rag"]
    assert he["config"]["he"] and not plain["config"]["he"]
    err = {r["round"]: r for r in he["rounds"]}[1]["server_he-max-abs-err"]
    assert 0 < err <= 1e-6
    # the same cell again: read, not run; another setting: run again
    again = table.run_cell("fede4rag", 3, tmp_path, setting, num_supernodes=2)
    assert calls == ["fede4rag", "fede4rag"] and again == plain
    table.run_cell("fede4rag", 3, tmp_path, {**setting, "lr": 0.02}, num_supernodes=2)
    assert len(calls) == 3
    path = tmp_path / "fede4rag-seed3" / "results.json"
    assert json.loads(path.read_text())["config"]["lr"] == 0.02
    tiny = "model=tiny,max-docs=300,local-steps=2,lr=0.01"
    argv = ["--seeds", "3", "--cells", "fede4rag,fede4rag+he", "--out", str(tmp_path)]
    md = table.main([*argv, "--rounds", "1", "--clients", "2", "--set", tiny])
    assert len(calls) == 4  # the lr=0.02 run replaced the lr=0.01 one: run again; he: read
    assert "| fede4rag | CKKS |" in md and "| fede4rag | no |" in md
