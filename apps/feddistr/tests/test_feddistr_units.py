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
    assert METHODS.names == (
        "feddistr", "feddistr-noinv", "feddistr-noalign", "fedavg", "fedprox", "centralized"
    )  # fmt: skip
    kinds = {n: m.kind for n, m in METHODS.items()}
    assert kinds["feddistr"] == "reconstruction" and kinds["feddistr-noalign"] == "ablation"
    assert kinds["feddistr-noinv"] == "ablation"
    assert METHODS["feddistr"].flag("invert") is True
    assert METHODS["feddistr-noinv"].flag("invert") is False
    assert METHODS["feddistr-noinv"].flag("align") is True
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


# ---------------------------------------------------------------- rigor (#13): the method code
from feddistr import generator as G  # noqa: E402


def test_cluster_moments_by_hand():
    # codes 0 and 2 (one dim), encoder variances 1 and 3: m = 1,
    # s^2 = var(codes) + mean(encoder variance) = 1 + 2 = 3
    mu = torch.tensor([[0.0, 5.0], [2.0, 5.0]])
    logvar = torch.log(torch.tensor([[1.0, 1e-9], [3.0, 1e-9]]))
    m, logstd = task.cluster_moments(mu, logvar)
    torch.testing.assert_close(m, torch.tensor([1.0, 5.0]))
    torch.testing.assert_close(logstd, 0.5 * torch.log(torch.tensor([3.0, 1e-6])))


class ToyGen:
    """eps_theta(z_t, t, c) = (z_t - sqrt(abar_t) c) / sqrt(1 - abar_t): the exact noise when
    z_0 = c, so the denoising loss is abar/(1 - abar) ||z_0 - c||^2, minimised at c = z_0."""

    cfg = G.TINY

    def __init__(self):
        self.abar = G.scheduler(G.TINY).alphas_cumprod

    def eps(self, z_t, t, c):
        ab = self.abar[t][:, None]
        return (z_t - ab.sqrt() * c) / (1 - ab).sqrt()


def _toy_clusters():
    centers = torch.tensor([[0.5, -0.3, 0.2], [-0.4, 0.1, 0.6]])
    cluster = torch.tensor([0] * 6 + [1] * 4)
    return centers, centers[cluster], cluster


def test_invert_recovers_the_cluster_latent_on_a_toy_denoiser():
    centers, z0, cluster = _toy_clusters()
    init = torch.zeros(2, 3)
    logstd = torch.full((2, 3), -6.0)
    g = torch.Generator().manual_seed(0)
    m, s, loss = G.invert(ToyGen(), z0, cluster, init, logstd, 300, lr=0.02, generator=g)
    torch.testing.assert_close(m, centers, atol=0.03, rtol=0)
    torch.testing.assert_close(s, logstd)  # fit_std=False: s is kept
    assert loss < 0.5  # the denoising loss at the optimum (s ~ 0) is ~0
    # 0 steps: the initial parameters come back unchanged
    m0, s0, loss0 = G.invert(ToyGen(), z0, cluster, init, logstd, 0)
    assert torch.equal(m0, init) and torch.equal(s0, logstd) and loss0 != loss0


def test_invert_samples_the_condition_noise_and_fit_std_switch():
    # with c ~ N(m, s^2) the loss has the term abar/(1-abar) d s^2: fitting log s shrinks it
    centers, z0, cluster = _toy_clusters()
    logstd = torch.zeros(2, 3)
    g = torch.Generator().manual_seed(1)
    m, s, _ = G.invert(ToyGen(), z0, cluster, centers, logstd, 20, generator=g, fit_std=True)
    assert (s < -0.5).all()
    assert (s >= -6).all()  # clamped to [-6, 1]


def test_denoising_loss_is_the_mse_to_the_true_noise():
    class Zero(ToyGen):
        def eps(self, z_t, t, c):
            return torch.zeros_like(z_t)

    centers, z0, cluster = _toy_clusters()
    # predicting 0: E ||eps||^2 / dim = 1
    loss = G.denoising_loss(Zero(), z0, cluster, centers, torch.zeros(2, 3), draws=4000)
    assert abs(loss - 1.0) < 0.03
    # the exact denoiser at c = z_0 with s -> 0: ~0; a wrong condition: large
    exact = G.denoising_loss(ToyGen(), z0, cluster, centers, torch.full((2, 3), -12.0))
    wrong = G.denoising_loss(ToyGen(), z0, cluster, -centers, torch.full((2, 3), -12.0))
    assert exact < 1e-3 < 1.0 < wrong


def test_ddim_sample_draws_the_condition_from_the_gaussian_and_guides():
    gen = G.load_or_build(G.TINY)
    seen = []
    eps = gen.eps

    def spy(z, t, c):
        seen.append(None if c is None else c.clone())
        return eps(z, t, c)

    gen.eps = spy
    mean, logstd = torch.linspace(-0.5, 0.5, 8), torch.full((8,), np.log(0.3))
    x = G.sample(gen, mean, logstd, 5, ddim_steps=4, generator=torch.Generator().manual_seed(3))
    assert x.shape == (5, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert len(seen) == 4 and all(c is not None for c in seen)  # 4 DDIM steps, conditioned
    unit = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))  # drawn first
    torch.testing.assert_close(seen[0], mean[None] + 0.3 * unit)
    seen.clear()
    y = G.sample(gen, mean, logstd, 5, 4, guidance=3.0, generator=torch.Generator().manual_seed(3))
    assert [c is None for c in seen] == [False, True] * 4  # conditional + null per step
    assert not torch.allclose(x, y, atol=1e-4)  # guidance changes the images
    gen.eps = eps
    # the condition matters: another mean, same noise, other images
    z = G.sample(gen, -mean, logstd, 5, 4, generator=torch.Generator().manual_seed(3))
    assert (x - z).abs().mean() > 1e-3


def test_upload_labels_counts_and_code_moments_match_the_local_classes():
    """feddistr-noinv uploads the code moments: per class, the count-weighted mixture of the
    uploaded Gaussians has exactly the mean and variance of that class's codes + encoder noise."""
    cfg = task.parse_config({**TINY, "method": "feddistr-noinv", "clusters-per-class": 2})
    arrays, metrics = task.client_upload(cfg, 1, 3)
    x, y = task.client_data(cfg, 1, 3)
    gen = G.load_or_build(G.TINY)
    mu, logvar = gen.sem(x)
    lab, cnt = arrays["label"], arrays["count"]
    for c in sorted(set(y.tolist())):
        rows = lab == c
        assert cnt[rows].sum() == int((y == c).sum())  # the label of a cluster is its class
        w = cnt[rows] / cnt[rows].sum()
        m = (w[:, None] * arrays["mean"][rows]).sum(0)
        second = w[:, None] * (np.exp(2 * arrays["logstd"][rows]) + arrays["mean"][rows] ** 2)
        codes = mu[y == c].double().numpy()
        np.testing.assert_allclose(m, codes.mean(0), atol=1e-5)
        var = codes.var(0) + np.exp(logvar[y == c].double().numpy()).mean(0)
        np.testing.assert_allclose(second.sum(0) - m**2, var, rtol=1e-3, atol=1e-6)
    assert "inv-loss-init" not in metrics  # no inversion on this path


def test_inversion_is_the_default_and_lowers_the_denoising_loss():
    cfg = task.parse_config({**TINY, "inversion-steps": 30, "inversion-lr": 0.05})
    assert task.parse_config({})["inversion-steps"] > 0  # the default path inverts
    assert task.inversion_steps(task.parse_config({"method": "feddistr-noinv"})) == 0
    inv, metrics = task.client_upload(cfg, 0, 3)
    plain, _ = task.client_upload(task.parse_config({**TINY, "method": "feddistr-noinv"}), 0, 3)
    # inversion moves the uploaded means, keeps s, labels and counts
    assert np.abs(inv["mean"] - plain["mean"]).max() > 0.05
    for k in ("logstd", "label", "count"):
        np.testing.assert_array_equal(inv[k], plain[k])
    # ... and lowers the objective E||eps - eps_theta(z_t, t, c)||^2 on the same fixed draw
    # (the tiny generator barely uses its condition: 0.5432 -> 0.5427; the default one:
    # 0.1195 -> 0.1142 on client 0 of the disentangled partition, seed 0)
    assert metrics["inv-loss-final"] < metrics["inv-loss-init"]


def test_upload_reply_carries_only_distribution_parameters():
    """Privacy of the upload: four small arrays (k x d means and log-stds, k labels and
    counts) and scalar metrics; no image, latent or per-sample value leaves the client."""
    msg = mock_reply(RecordDict({"config": ConfigRecord({"server-round": 1})}))
    out = client_app.train(msg, _ctx(TINY)).content
    assert list(out.array_records) == ["arrays"] and list(out.config_records) == []
    arr = out["arrays"]
    assert sorted(arr) == ["count", "label", "logstd", "mean"]
    k = len(arr["label"].numpy())
    assert arr["mean"].numpy().shape == arr["logstd"].numpy().shape == (k, 8)
    _, y = task.client_data(task.parse_config(TINY), 1, 3)
    assert k <= 3 * len(set(y.tolist())) < len(y)  # far fewer rows than samples
    assert set(out["metrics"]) == {
        "num-examples", "num-distributions", "inv-loss", "inv-loss-init", "inv-loss-final",
        "partition-id",
    }  # fmt: skip
