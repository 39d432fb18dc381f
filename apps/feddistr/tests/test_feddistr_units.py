"""FedDistr units: the registered partitioners, config errors, the method table, direct ClientApp
calls with the tiny generator. (Alignment, upload checks and the one-shot round are tested on
mock replies in ``strategies/feddistr_test.py``.)"""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from flowerbed.common.config import ConfigError, check_pyproject
from flowerbed.common.partition import partition_indices, partitioners
from flowerbed.common.records import wire_nbytes
from flowerbed.common.testing import app_path, mock_reply, node_context

app_path("feddistr")
from feddistr import client_app, task  # noqa: E402
from feddistr.methods import METHODS  # noqa: E402

from flowerbed.strategies.feddistr import check_upload  # noqa: E402


def test_pyproject_matches_schema():
    assert check_pyproject(app_path("feddistr"), task.SCHEMA) == []


def test_partitioners_disentangled_near_entangled():
    assert {"disentangled", "near", "entangled"} <= set(partitioners())
    y = np.repeat(np.arange(10), 50)
    parts = partition_indices(y, 5, "disentangled", seed=1)
    classes = [set(y[p]) for p in parts]
    assert all(len(c) == 2 for c in classes)
    assert set().union(*classes) == set(range(10)) and sum(map(len, parts)) == 500
    near = partition_indices(y, 5, "near", seed=1, xi=0.2)
    assert sum(map(len, near)) == 500 and len(set(np.concatenate(near))) == 500
    for p, own in zip(near, classes, strict=True):
        dominant = np.isin(y[p], list(own)).mean()
        assert 0.6 < dominant < 0.95  # ~ (1 - xi) of a client's data is its own group
    zero = partition_indices(y, 5, "near", seed=1, xi=0.0)
    assert [list(p) for p in zero] == [list(p) for p in parts]
    with pytest.raises(ValueError, match="11 clients > 10 classes"):
        partition_indices(y, 11, "disentangled", seed=0)
    # entangled = flwr-datasets' Dirichlet partitioner, the same split as `dirichlet`
    ent = partition_indices(y, 5, "entangled", seed=3, alpha=0.5)
    dirichlet = partition_indices(y, 5, "dirichlet", seed=3, alpha=0.5)
    assert [list(p) for p in ent] == [list(p) for p in dirichlet]


def test_disentangled_classes_are_the_seeded_permutation_split():
    # hand check: rng(0).permutation(10) split in 5 groups of 2, group g -> client g
    perm = np.random.default_rng(0).permutation(10)
    y = np.arange(10)
    parts = partition_indices(y, 5, "disentangled", seed=0)
    assert [sorted(y[p]) for p in parts] == [sorted(perm[2 * g : 2 * g + 2]) for g in range(5)]


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"method": "scaffold"}, "method='scaffold'"),
        ({"partitioner": "zipf"}, "partitioner='zipf'"),
        ({"xi": 1.5}, "xi=1.5"),
        ({"train-size": 60000}, "train-size=60000"),
        ({"dataset": "digits"}, "dataset='digits'"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"no-such-key": 1}, "unknown run config key 'no-such-key'"),
    ],
)
def test_bad_run_config_names_the_value(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        task.parse_config(bad)


def test_method_table_rows_and_flags():
    assert METHODS.names == ("feddistr", "feddistr-noalign", "fedavg", "fedprox", "centralized")
    kinds = {n: m.kind for n, m in METHODS.items()}
    assert kinds["feddistr"] == "reconstruction" and kinds["feddistr-noalign"] == "ablation"
    # one-shot methods run one round whatever num-server-rounds says; FedAvg runs them all
    assert METHODS["feddistr"].flag("rounds") == 1 and METHODS["centralized"].flag("rounds") == 1
    assert METHODS["fedavg"].flag("rounds") is None
    assert METHODS["feddistr"].flag("align") is True
    assert METHODS["feddistr-noalign"].flag("align") is False
    cfg = task.parse_config({"method": "feddistr-noalign"})
    s = cfg.method.strategy(cfg, cond_dim=8, sample=None, train_classifier=None)
    assert s.align is False and s.threshold == 0.5 and s.synthetic_per_class == 200
    assert METHODS["centralized"].flag("raw_upload") is True


TINY = {
    "generator": "tiny",
    "train-size": 300,
    "test-size": 300,
    "inversion-steps": 3,
    "partitioner": "near",
}


def _ctx(run_config, pid=1, n=3):
    return node_context(pid, n, run_config)


def test_client_upload_direct_call_is_one_small_deterministic_message():
    ctx = _ctx(TINY)
    msg = mock_reply(RecordDict({"config": ConfigRecord({"server-round": 1})}))
    out = client_app.train(msg, ctx).content
    arr = {k: v.numpy() for k, v in out["arrays"].items()}
    assert check_upload(arr, 8) is None
    _, y = task.client_data(task.parse_config(TINY), 1, 3)
    labels = arr["label"].tolist()
    assert set(labels) == set(y.tolist())  # every local class is described ...
    assert max(labels.count(c) for c in set(labels)) <= 3  # ... by <= clusters-per-class dists
    assert arr["count"].sum() == len(y) == out["metrics"]["num-examples"]
    assert out["metrics"]["partition-id"] == 1
    assert wire_nbytes(out) < 2000  # 10 x (8 + 8) floats + labels + counts + metrics
    again = {k: v.numpy() for k, v in client_app.train(msg, ctx).content["arrays"].items()}
    np.testing.assert_array_equal(arr["mean"], again["mean"])


def test_fedavg_baseline_client_changes_the_model():
    from flowerbed.common.records import to_record

    cfg = {**TINY, "method": "fedavg"}
    model = task.make_model(task.parse_config(cfg))
    content = RecordDict({"arrays": to_record(model), "config": ConfigRecord({"server-round": 1})})
    out = client_app.train(mock_reply(content), _ctx(cfg, pid=0)).content
    assert out["metrics"]["steps"] > 0
    w0 = model.state_dict()["classifier.3.weight"]
    w1 = out["arrays"].to_torch_state_dict()["classifier.3.weight"]
    assert not torch.equal(w0, w1)
    # FedProx: the proximal weight comes with the message (Flower's FedProx sends it)
    content["config"]["proximal-mu"] = 10.0
    prox = client_app.train(mock_reply(content), _ctx({**cfg, "method": "fedprox"}, pid=0))
    w2 = prox.content["arrays"].to_torch_state_dict()["classifier.3.weight"]
    assert (w2 - w0).norm() < (w1 - w0).norm()
