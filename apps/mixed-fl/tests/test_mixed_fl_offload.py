"""Mixed FL offloading scenario: the rows a client asks for and receives, its step on them
(equal to the full-table step restricted to them), the baseline's regulariser on every row, the
hinge and ranks by hand, and a run of both methods asserting the client bytes and FLOPs saved
from results.json."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from flowerbed.common.embedding import spreadout_flops
from flowerbed.common.testing import app_path, mock_reply, node_context

APP = app_path("mixed-fl")

from mixedfl import client_app, offload, task  # noqa: E402

from flowerbed.strategies.mixed_fl_offload import IDS, ROWS, TABLE  # noqa: E402

#: 12 MovieLens-100K users, one per node
OFF = {"offload-users": 12, "num-server-rounds": 2, "fraction-train": 0.5, "local-steps": 3}


def _cfg(**over):
    return task.parse_config({**OFF, "method": "offload", **over})


def _train(content, pid=0, **over):
    ctx = node_context(pid, 12, run_config={**OFF, "method": "offload", **over})
    return client_app.train(mock_reply(content), ctx).content


def test_client_asks_for_exactly_the_rows_of_its_training_items():
    cfg = _cfg()
    ctx = node_context(0, 12, run_config={**OFF, "method": "offload"})
    msg = mock_reply(RecordDict({"config": ConfigRecord({"server-round": 1})}))
    ids = client_app.ids(msg, ctx).content[IDS][IDS].numpy()
    users = offload.load_users(12)
    first = sorted(users.train)[0]  # node 0 of 12: the first user
    ex = users.train[first]
    want = np.unique(np.concatenate([ex.context.ravel(), ex.label]))
    np.testing.assert_array_equal(ids, want[want > 0])
    assert ids.dtype == np.int32 and len(ids) < 0.2 * users.num_items
    assert users.test.label[0] not in ids  # the held-out item is never a training row
    assert cfg["offload-users"] == 12


def test_offload_step_equals_the_full_table_step_on_its_rows():
    """w_c = 0: the baseline steps on the hinge alone over the whole table; the offloaded client
    on its rows only. Same seed, same batches: the same rows come back (a wrong id remap, a
    shifted row or a dropped padding row breaks it); the other rows do not move."""
    cfg = _cfg()
    table = offload.initial_table(cfg)
    ctx = node_context(0, 12, run_config={**OFF, "method": "offload"})
    ids = client_app.ids(mock_reply(RecordDict()), ctx).content[IDS][IDS].numpy()
    conf = ConfigRecord({"server-round": 1})
    sparse = _train(
        RecordDict({ROWS: ArrayRecord({IDS: Array(ids), ROWS: Array(table[ids])}), "config": conf})
    )
    full = _train(
        RecordDict(
            {
                "arrays": ArrayRecord({TABLE: Array(table)}),
                "config": ConfigRecord(
                    {"server-round": 1, "w-f": 1.0, "w-c": 0.0, "spreadout-lambda": 1e-3}
                ),
            }
        )
    )
    got, whole = sparse[ROWS][ROWS].numpy(), full[ROWS][ROWS].numpy()
    assert got.shape == (len(ids), table.shape[1])
    np.testing.assert_allclose(got, whole[ids], atol=1e-6)
    assert not np.allclose(got, table[ids])  # it did train
    others = np.setdiff1d(np.arange(len(table)), ids)
    np.testing.assert_array_equal(whole[others], table[others])
    m = sparse["metrics"]
    assert m["client-steps"] == 3 and 0 < m["client-rows"] <= 3 * len(ids)


def test_baseline_client_computes_the_regulariser_on_every_row():
    cfg = _cfg()
    table = offload.initial_table(cfg)
    conf = ConfigRecord({"server-round": 1, "w-f": 0.7, "w-c": 0.3, "spreadout-lambda": 1e-3})
    out = _train(RecordDict({"arrays": ArrayRecord({TABLE: Array(table)}), "config": conf}))
    new = out[ROWS][ROWS].numpy()
    v, d = table.shape[0] - 1, table.shape[1]
    assert new.shape == table.shape
    np.testing.assert_array_equal(new[0], 0.0)  # padding
    assert (np.abs(new[1:] - table[1:]).max(-1) > 0).all()  # every item row moved
    m = out["metrics"]
    assert m["client-rows"] == 3 * v
    assert m["client-flops"] > 3 * spreadout_flops(v, d)


def test_hinge_and_ranks_by_hand():
    t = torch.tensor([[0, 0], [1, 0], [0.6, 0.8], [0, 1], [1, 0]], dtype=torch.float64)
    ctx = torch.tensor([[1, 0], [1, 3]])
    # context [1] -> (1, 0); label 2: cos 0.6 -> (0.9 - 0.6)^2 = 0.09
    # context [1, 3] -> (1, 1)/sqrt2; label 4 = (1, 0): cos 1/sqrt2 -> (0.9 - 0.7071)^2
    h = offload.hinge(t, ctx, torch.tensor([2, 4])).item()
    assert h == pytest.approx((0.09 + (0.9 - 2**-0.5) ** 2) / 2)
    # scores of context [1] against items 1..4: 1, 0.6, 0, 1: label 2 ranks 3rd, label 4 ties
    # with item 1 and ranks 2nd (ties count against it)
    r = offload.ranks(t, torch.tensor([[1, 0], [1, 0]]), torch.tensor([2, 4]))
    assert r.tolist() == [3, 2]


def test_offload_saves_client_bytes_and_compute(tmp_path):
    from flowerbed.simulation.local import run_local

    recs = {}
    for method in ("offload", "offload-baseline"):
        out = tmp_path / method
        run_local("mixed-fl", {**OFF, "method": method, "results-dir": str(out)}, num_supernodes=12)
        recs[method] = json.loads((out / "results.json").read_text())
    off, base = (recs[m]["rounds"][1] for m in ("offload", "offload-baseline"))
    assert sorted(r["round"] for r in recs["offload"]["rounds"]) == [0, 1, 2]
    assert set(off["phases"]) == {"offload.ids", "train"} and set(base["phases"]) == {"train"}
    assert off["phases"]["train"]["num_replies"] == base["phases"]["train"]["num_replies"] == 6
    # the first 12 users hold ~140 items each (all 943: ~106), so their rows are ~8 % of the
    # table; the README's table measures all users
    assert off["phases"]["train"]["num_failures"] == 0
    d, v = 16, 1682
    # the baseline moves the whole float32 table each way per client
    assert base["bytes_sent"] / 6 > 4 * (v + 1) * d
    assert base["bytes_received"] / 6 > 4 * (v + 1) * d
    for key in ("bytes_sent", "bytes_received"):  # both phases of the offloaded round
        assert off[key] < 0.15 * base[key]
    assert off["train_client-flops"] < 0.1 * base["train_client-flops"]
    assert off["train_client-rows"] < 0.15 * base["train_client-rows"]
    assert off["train_client-steps"] == base["train_client-steps"] == 3
    assert off["server_flops"] == 5 * spreadout_flops(v, d) and base["server_flops"] == 0
    final = recs["offload"]["extra"]["final"]
    assert np.isfinite(final["f_c"]) and 0 <= final["recall@10"] <= 1


def test_curves_read_f_f_and_f_c_per_round(tmp_path):
    from mixedfl.curves import curves

    rec = {
        "rounds": [
            {"round": 0, "server_f_f": 0.9, "server_f_c": 177.0},
            {"round": 1, "server_f_f": 0.8, "server_f_c": 176.5},
            {"round": 2, "server_f_f": 0.7},
        ]
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rec))
    c = curves(path)
    assert c == {"round": [0, 1], "server_f_f": [0.9, 0.8], "server_f_c": [177.0, 176.5]}
