"""Template app: config, the client step called directly, a run of every method on a test grid
(no Ray) asserting on results.json, and one `flwr run` end to end."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from flowerbed.common.config import ConfigError, check_pyproject
from flowerbed.common.testing import app_path, mock_reply, node_context

APP = app_path("template")

from template import client_app, task  # noqa: E402
from template.methods import METHODS  # noqa: E402


def test_pyproject_defaults_are_the_schema_defaults():
    assert check_pyproject(APP, task.SCHEMA) == []


def test_bad_key_or_value_is_one_line():
    with pytest.raises(ConfigError, match=r"^unknown run config key 'rounds'; valid keys: "):
        task.parse_config({"rounds": 1})
    with pytest.raises(ConfigError, match=r"method='fedmagic': must be one of fedavg, fedprox"):
        task.parse_config({"method": "fedmagic"})


def _ctx(pid: int, state=None) -> Context:
    return node_context(pid, 3, state=state)


def test_client_step_is_seeded_and_fedprox_reads_mu_from_the_message():
    cfg = task.parse_config({})
    init = task.initial_arrays(cfg)

    def call(config: dict, ctx=None):
        content = RecordDict({"arrays": init, "config": ConfigRecord(config)})
        return client_app.train(mock_reply(content), ctx or _ctx(1)).content

    a = call({"server-round": 1})
    assert a["metrics"]["num-examples"] == 479  # 1437 digits train images / 3 (iid)
    b = call({"server-round": 1})
    assert all(np.array_equal(a["arrays"][k].numpy(), b["arrays"][k].numpy()) for k in a["arrays"])
    c = call({"server-round": 2})
    assert any(
        not np.array_equal(a["arrays"][k].numpy(), c["arrays"][k].numpy()) for k in a["arrays"]
    )
    # a large mu keeps the update close to the received model: the proximal term is used
    far = sum(np.sum((a["arrays"][k].numpy() - init[k].numpy()) ** 2) for k in init)
    prox = call({"server-round": 1, "proximal-mu": 5.0})
    near = sum(np.sum((prox["arrays"][k].numpy() - init[k].numpy()) ** 2) for k in init)
    assert near < 0.2 * far


def test_local_only_client_continues_from_its_own_model():
    cfg = task.parse_config({})
    init = task.initial_arrays(cfg)
    state = RecordDict()
    content = RecordDict(
        {"arrays": init, "config": ConfigRecord({"server-round": 1, "local-only": True})}
    )
    r1 = client_app.train(mock_reply(content), _ctx(0, state)).content["arrays"]
    content["config"]["server-round"] = 2
    r2 = client_app.train(mock_reply(content), _ctx(0, state)).content["arrays"]
    # round 2 started from round 1's model, not from `init`: same as two global rounds in a row
    content2 = RecordDict({"arrays": r1, "config": ConfigRecord({"server-round": 2})})
    ref = client_app.train(mock_reply(content2), _ctx(0)).content["arrays"]
    assert all(np.array_equal(r2[k].numpy(), ref[k].numpy()) for k in r2)


@pytest.mark.parametrize("method", METHODS.names)
def test_every_method_runs_and_learns(tmp_path, method):
    from flowerbed.simulation.local import run_local

    out = tmp_path / method
    run_local("template", {"method": method, "results-dir": str(out)}, num_supernodes=3)
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    assert rounds[0]["server_accuracy"] < 0.2  # untrained model: chance on 10 digits
    assert rec["extra"]["final"]["accuracy"] > 0.5
    # every method keeps improving over rounds (local-only: each client continues its own model)
    assert rounds[3]["server_accuracy"] > rounds[1]["server_accuracy"] + 0.05
    if method == "centralized":  # no message crosses the wire
        assert rec["extra"]["totals"]["bytes_sent"] == rec["extra"]["totals"]["bytes_received"] == 0
    else:
        assert rounds[1]["phases"]["train"]["num_replies"] == 3
        assert rounds[1]["bytes_sent"] > 3 * 4 * 55_000  # the MLP (55,210 floats), to 3 clients
        assert rounds[1]["bytes_received"] > 3 * 4 * 55_000


def test_participation_gap_columns(tmp_path):
    """Participation-gap evaluation on (issue 16): 1 of 4 clients never trains, every client
    is evaluated on its splits, the gap columns are in every round and in ``final``; a phased
    method (local-only) with the split on stops with a named error."""
    from flowerbed.common.participation import ParticipationError, unparticipating_partitions
    from flowerbed.simulation.local import run_local

    over = {"unparticipating-fraction": 0.25, "num-server-rounds": 2}
    out = tmp_path / "gap"
    run_local("template", {**over, "results-dir": str(out)}, num_supernodes=4)
    rec = json.loads((out / "results.json").read_text())
    for r in rec["rounds"][1:]:
        assert r["num_sampled"] == 3 and r["num_failures"] == 0  # the 4th would raise
        assert r["unparticipating_partitions"] == unparticipating_partitions(4, 0.25, 42)
        assert r["client_num_part_clients"] == 3 and r["client_num_unpart_clients"] == 1
        gap = r["client_part_val_accuracy_mean"] - r["client_unpart_accuracy_mean"]
        assert r["client_participation_gap_accuracy"] == pytest.approx(gap)
    final = rec["extra"]["final"]
    assert final["part_train_accuracy_mean"] > 0.5 and "participation_gap_accuracy" in final
    with pytest.raises(ParticipationError, match="is phased"):
        run_local("template", {**over, "method": "local"}, num_supernodes=4)


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    p = flwr_run("template", {"num-server-rounds": 1, "results-dir": str(out)}, num_supernodes=2)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in rec["rounds"]] == [0, 1] and rec["extra"]["final"]["accuracy"] > 0.5


def test_flwr_run_names_an_unknown_key_before_anything_starts():
    """Flower's own check answers "Invalid run configuration" without the key; flowerbed's
    `flwr run` driver (and the runner) name it, with the app's valid keys, in one line."""
    from flowerbed.simulation.flwr_cli import flwr_run

    with pytest.raises(ValueError) as e:
        flwr_run("template", {"rounds": 1})
    msg = str(e.value)
    assert msg.startswith("unknown run config key 'rounds' for app 'template'; valid keys: ")
    assert "num-server-rounds" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"^run config lr=-1.0: learning rate > 0$"):
        flwr_run("template", {"lr": -1.0})
