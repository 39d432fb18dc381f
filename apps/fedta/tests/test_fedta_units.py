"""FedTA app: KR metrics, anchor selection, prototypes, data slices, config errors."""

import numpy as np
import pytest
import torch

from flowerbed.common.testing import app_path

app_path("fedta")

from fedta import data as D  # noqa: E402
from fedta import task as T  # noqa: E402
from fedta.methods import METHODS  # noqa: E402

from flowerbed.common.config import ConfigError, check_pyproject  # noqa: E402
from flowerbed.common.partition import partition_indices  # noqa: E402
from flowerbed.strategies.fedta import kr_s, kr_t  # noqa: E402


# ---------------------------------------------------------------- KR metrics (Eqs. 11-12)
def test_kr_t_is_mean_ratio_of_first_task_accuracy():
    first = {0: 0.8, 1: 0.5, 2: 0.0}  # client 2: undefined ratio, left out
    now = {0: 0.4, 1: 0.5, 2: 0.3}
    assert kr_t(first, now) == pytest.approx((0.4 / 0.8 + 0.5 / 0.5) / 2)
    assert np.isnan(kr_t({0: 0.0}, {0: 1.0}))


def test_kr_s_is_mean_ratio_global_over_local():
    assert kr_s({0: 0.9, 1: 0.3}, {0: 0.9, 1: 0.6}) == pytest.approx((1.0 + 0.5) / 2)
    assert kr_s({0: 0.9}, {0: 0.9, 5: 0.5}) == pytest.approx(1.0)  # client 5: no global acc


# ---------------------------------------------------------------- anchors (Eqs. 4-5)
def test_anchor_selection_picks_the_closest_key_by_cosine():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    f_out = torch.tensor([[10.0, 1.0], [0.2, 3.0], [-1.0, -0.5], [5.0, 5.1]])
    assert T.select_anchor(f_out, keys).tolist() == [0, 1, 2, 1]


def test_mixing_operators():
    f, a = torch.ones(2, 3), torch.full((2, 3), 2.0)
    torch.testing.assert_close(T.mix(f, a, torch.zeros(1), "add"), torch.full((2, 3), 3.0))
    torch.testing.assert_close(T.mix(f, a, torch.zeros(1), "gated"), torch.full((2, 3), 2.0))


def test_prototype_logits_and_contrastive_loss():
    protos = {2: torch.tensor([1.0, 0.0]), 7: torch.tensor([0.0, 1.0])}
    f = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    logits = T.prototype_logits(f, protos, tau=0.5)
    assert torch.isinf(logits[:, [0, 1, 3, 4, 5, 6, 8, 9]]).all()
    torch.testing.assert_close(logits[0, [2, 7]], torch.tensor([2.0, 0.0]))
    s = 2**-0.5 / 0.5
    torch.testing.assert_close(logits[1, [2, 7]], torch.tensor([s, s]))
    # Eq. 5 on sample 0 (class 2): -log(e^2 / (e^2 + e^0)); sample of class 5 has no prototype
    loss = T.contrastive_loss(f[:1].repeat(2, 1), torch.tensor([2, 5]), protos, 0.5)
    assert float(loss) == pytest.approx(-np.log(np.exp(2) / (np.exp(2) + 1)), rel=1e-5)
    assert float(T.contrastive_loss(f, torch.tensor([2, 7]), {}, 0.5)) == 0.0


def test_ie_loss_eq3_hand_computed():
    # CE + lambda1 * mean over samples of the SUM over selected keys of (1 - cos(query, key))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [1.0, 1.0]]])  # (B, N, D)
    ce = (np.log(1 + np.exp(-2.0)) + np.log(1 + np.exp(1.0))) / 2
    pull = ((0 + 1) + (0 + 1 - 2**-0.5)) / 2
    assert float(T.ie_loss(logits, y, q, keys, 2.0)) == pytest.approx(ce + 2 * pull, rel=1e-6)
    assert float(T.ie_loss(logits, y, q, keys, 0.0)) == pytest.approx(ce, rel=1e-6)


def test_ta_loss_eq6_hand_computed():
    # CE(head) + lambda2 * L_cons (Eq. 5, cosine / tau) + lambda3 * mean (1 - cos(F_TA, K_ta))
    logits = torch.tensor([[1.0, 0.0, 0.0]])
    y = torch.tensor([2])
    f_ta = torch.tensor([[3.0, 0.0]])
    anchor_keys = torch.tensor([[1.0, 1.0]])
    protos = {2: torch.tensor([1.0, 0.0]), 7: torch.tensor([0.0, 1.0])}
    # note: logits has 3 columns, class 2 is the last
    ce = -np.log(1 / (np.e + 2))
    cons = -np.log(np.exp(2.0) / (np.exp(2.0) + 1))  # tau 0.5: cos 1 -> 2, cos 0 -> 0
    dis = 1 - 2**-0.5
    got = T.ta_loss(logits, y, f_ta, anchor_keys, protos, 0.5, 2.0, 3.0)
    assert float(got) == pytest.approx(ce + 2 * cons + 3 * dis, rel=1e-6)
    # no global prototypes yet (the first round): no contrastive term
    got = T.ta_loss(logits, y, f_ta, anchor_keys, {}, 0.5, 2.0, 3.0)
    assert float(got) == pytest.approx(ce + 3 * dis, rel=1e-6)


def _tiny_setup(**over):
    cfg = T.parse_config(
        {
            "vit-dim": 8,
            "vit-heads": 2,
            "pool-size": 3,
            "top-n": 2,
            "num-anchors": 4,
            "local-epochs": 1,
            "batch-size": 4,
            **over,
        }
    )
    torch.manual_seed(0)
    from flowerbed.common.models import TinyViT, freeze

    bb = freeze(TinyViT(dim=8, heads=2, depth=1))
    shared = {"prompts": torch.randn(3, 2, 8), "keys": torch.randn(3, 8)}
    return cfg, bb, shared, T.initial_personal(cfg, 8, 0)


def test_stage1_pulls_the_selected_keys_towards_the_queries():
    # a large lambda1: the selected keys must get closer (cosine) to their queries; with the sign
    # of the pull flipped they move away
    cfg, bb, shared, personal = _tiny_setup(**{"lambda1": 20.0, "local-epochs": 5, "lr": 0.05})
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 4] * 4)
    from flowerbed.common.models import select_topk

    def closeness(keys):
        q = bb.features(bb.embed(x))
        sel = select_topk(q, keys, 2)
        return float(torch.nn.functional.cosine_similarity(q[:, None], keys[sel], dim=-1).mean())

    res = T.train_fedta(cfg, bb, shared, personal, {}, x, y, torch.Generator().manual_seed(0))
    assert closeness(res.upload["keys"]) > closeness(shared["keys"]) + 0.2


def test_stage2_uses_lambda2_and_the_global_prototypes():
    # Eq. 6 in training: with global prototypes, lambda2 = 0 and lambda2 = 5 train other anchors;
    # without global prototypes (first round) lambda2 has no effect (L_cons is skipped)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([1, 4] * 4)
    g = torch.Generator().manual_seed(9)
    protos = {1: torch.randn(8, generator=g), 4: torch.randn(8, generator=g)}
    ta = {}
    for lam in (0.0, 5.0):
        for p in ("with", "without"):
            cfg, bb, shared, personal = _tiny_setup(**{"lambda2": lam})
            res = T.train_fedta(
                cfg,
                bb,
                shared,
                personal,
                protos if p == "with" else {},
                x,
                y,
                torch.Generator().manual_seed(0),
            )
            ta[lam, p] = res.personal["ta"]
    assert (ta[0.0, "with"] - ta[5.0, "with"]).abs().max() > 1e-3
    torch.testing.assert_close(ta[0.0, "without"], ta[5.0, "without"])


def test_local_prototypes_are_class_means_of_the_anchored_features():
    cfg, bb, shared, personal = _tiny_setup()
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([1, 1, 4, 4, 4, 1])
    res = T.train_fedta(cfg, bb, shared, personal, {}, x, y, torch.Generator().manual_seed(0))
    f_ta, _, _ = T.fedta_features(cfg, bb, res.upload, res.personal, x, use_ta=True)
    torch.testing.assert_close(res.protos[1], f_ta[y == 1].mean(0))
    torch.testing.assert_close(res.protos[4], f_ta[y == 4].mean(0))
    assert set(res.proto_keys) == {1, 4} and set(res.upload) == {"prompts", "keys"}
    # the key uploaded with each prototype: the TA key its class's samples matched most often
    _, f_out, j = T.fedta_features(cfg, bb, res.upload, res.personal, x, use_ta=True)
    for c in (1, 4):
        counts = torch.bincount(j[y == c], minlength=4)
        torch.testing.assert_close(res.proto_keys[c], res.personal["ta_keys"][counts.argmax()])
    assert not torch.equal(res.personal["ta"], personal["ta"])  # stage 2 trained the anchors
    # without tail anchors: prototypes are the class means of F_out, no keys are uploaded
    res = T.train_fedta(
        cfg, bb, shared, personal, {}, x, y, torch.Generator().manual_seed(0), use_ta=False
    )
    _, f_out, _ = T.fedta_features(cfg, bb, res.upload, res.personal, x, use_ta=False)
    torch.testing.assert_close(res.protos[4], f_out[y == 4].mean(0))
    assert res.proto_keys == {}
    torch.testing.assert_close(res.personal["ta"], personal["ta"])  # stage 2 skipped


# ---------------------------------------------------------------- data layout
def test_slices_are_disjoint_and_clients_disjoint():
    s = D.slices("", 1000, 5)
    assert len(np.intersect1d(s["pretrain"], s["surrogate"])) == 0
    assert len(np.intersect1d(s["pretrain"], s["pool"])) == 0
    assert len(np.intersect1d(s["surrogate"], s["pool"])) == 0
    assert len(s["pretrain"]) + len(s["surrogate"]) + len(s["pool"]) == 60000
    parts = D.client_indices(
        "", 1000, 5, 4, D.PARTITIONER, 7, alpha=0.5, samples_per_class=100, min_samples=5
    )
    for c in range(10):
        allc = np.concatenate([p[c] for p in parts])
        assert len(allc) == 100 and len(np.unique(allc)) == 100
        assert np.isin(allc, s["pool"]).all()
        assert min(len(p[c]) for p in parts) >= 5


def test_dirichlet_counts_and_task_streams():
    counts = D.dirichlet_counts(100, 5, 0.5, 3, np.random.default_rng(0))
    assert counts.sum() == 100 and counts.min() >= 3
    a = D.task_stream(1, 0, 10, 5, 2, "random")
    b = D.task_stream(1, 1, 10, 5, 2, "random")
    assert sorted(c for t in a for c in t) == list(range(10)) and a != b
    assert D.task_stream(1, 3, 10, 5, 2, "same")[0] == [0, 1]
    with pytest.raises(D.DataError, match="min-samples"):
        D.dirichlet_counts(10, 5, 0.5, 3, np.random.default_rng(0))


def test_per_class_dirichlet_partitioner_hand_computed():
    # 3 clients; class 0 has 7 rows, class 1 has 5: the first samples_per_class=5 rows of each
    # class are handed out, min_samples=1 each, the rest by the Dirichlet draw of (seed, class)
    labels = np.array([0, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0])
    parts = partition_indices(
        labels, 3, D.PARTITIONER, seed=3, alpha=0.5, samples_per_class=5, min_samples=1
    )
    from flowerbed.common.seeding import derive_seed

    for c in (0, 1):
        rng = np.random.default_rng(derive_seed(3, c, 0xD1C))
        counts = D.dirichlet_counts(5, 3, 0.5, 1, rng)
        rows = np.flatnonzero(labels == c)[:5]
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for i, p in enumerate(parts):
            np.testing.assert_array_equal(p[labels[p] == c], rows[bounds[i] : bounds[i + 1]])
    handed = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(handed, [0, 1, 2, 3, 4, 5, 6, 7, 9, 10])  # rows 8, 11 left out
    with pytest.raises(D.DataError, match="samples-per-class=6"):
        partition_indices(labels, 3, D.PARTITIONER, seed=4, samples_per_class=6, min_samples=1)


def test_pyproject_matches_schema_and_method_table():
    assert check_pyproject(app_path("fedta"), T.SCHEMA) == []
    assert list(METHODS) == [
        "fedta",
        "fedta-no-ta",
        "fedta-no-sikf",
        "fedta-no-bgps",
        "fedta-warmup",
        "l2p",
        "fedvit",
        "fedavg",
    ]
    assert [METHODS[m].kind for m in METHODS] == ["paper"] + ["ablation"] * 3 + [
        "reconstruction"
    ] + ["baseline"] * 3
    cfg = T.parse_config({"method": "fedta-no-sikf"})
    assert cfg.method.flag("ta") and cfg.method.flag("bgps") and not cfg.method.flag("sikf")
    assert not T.parse_config({"method": "fedta-no-ta"}).method.flag("ta")
    assert not T.parse_config({"method": "fedta-no-bgps"}).method.flag("bgps")
    assert not T.parse_config({"method": "fedvit"}).method.flag("prompts")


def test_rounds_per_task_is_derived_from_num_server_rounds():
    assert T.parse_config({})["rounds-per-task"] == 2
    assert T.parse_config({"num-server-rounds": 3, "num-tasks": 1})["rounds-per-task"] == 3
    with pytest.raises(ConfigError, match=r"^run config num-server-rounds=7: must be a multiple"):
        T.parse_config({"num-server-rounds": 7})
    with pytest.raises(ConfigError, match="rounds-per-task"):
        T.parse_config({"rounds-per-task": 2})  # the old key is gone


def test_bad_config_fails_with_the_key():
    with pytest.raises(ConfigError, match="method='fedprox'"):
        T.parse_config({"method": "fedprox"})
    with pytest.raises(ConfigError, match="partitioner='zipf'"):
        T.parse_config({"partitioner": "zipf"})
    with pytest.raises(ConfigError, match="num-tasks"):
        T.parse_config({"num-tasks": 6, "num-server-rounds": 12})
    with pytest.raises(ConfigError, match="vit-heads"):
        T.parse_config({"vit-dim": 30, "vit-heads": 4})
    with pytest.raises(ConfigError, match="bogus"):
        T.parse_config({"bogus": 1})


def test_fedta_upload_is_at_least_10x_smaller_than_fedavg_full_model():
    """Default config: pool + 2 prototypes (+ matched keys) vs the whole ViT + head."""
    from flowerbed.common.models import TinyViT

    cfg = T.parse_config({})
    bb = TinyViT(patch=7, dim=64, depth=2, heads=4)
    fedta = T.nvalues(T.initial_global(cfg, bb)) + 2 * 2 * 64
    fedavg = T.nvalues(T.initial_global(T.parse_config({"method": "fedavg"}), bb))
    assert fedta == 10 * 2 * 64 + 10 * 64 + 256
    assert fedavg >= 10 * fedta


def test_shared_parameters_follow_the_method_flags():
    from flowerbed.common.models import TinyViT

    bb = TinyViT(patch=7, dim=8, depth=1, heads=2)
    small = {"vit-dim": 8, "vit-heads": 2, "pool-size": 3, "top-n": 2}

    def keys(method):
        cfg = T.parse_config({**small, "method": method})
        return sorted(k for k in T.initial_global(cfg, bb) if not k.startswith("vit."))

    assert keys("fedta") == keys("fedta-no-ta") == ["keys", "prompts"]
    assert keys("l2p") == ["head.bias", "head.weight", "keys", "prompts"]
    assert keys("fedvit") == ["head.bias", "head.weight"]
    full = T.initial_global(T.parse_config({**small, "method": "fedavg"}), bb)
    assert {f"vit.{k}" for k in bb.state_dict()} <= set(full)


def test_predictions_are_restricted_to_the_seen_classes():
    cfg, bb, shared, personal = _tiny_setup()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    f_ta, _, _ = T.fedta_features(cfg, bb, shared, personal, x, use_ta=True)
    g = torch.Generator().manual_seed(6)
    # class 7's prototype is exactly the feature of sample 0: nearest for it unless 7 is unseen
    protos = {1: torch.randn(8, generator=g), 4: torch.randn(8, generator=g), 7: f_ta[0]}
    pred = T.predict(cfg, bb, shared, personal, protos, [1, 4], x)
    assert set(pred.tolist()) <= {1, 4}
    assert int(T.predict(cfg, bb, shared, personal, protos, [1, 4, 7], x)[0]) == 7
    # a baseline: the head prefers class 9, but only classes 2 and 3 were seen
    cfg = T.parse_config({"method": "fedvit", "vit-dim": 8, "vit-heads": 2})
    head = {"head.weight": torch.zeros(10, 8), "head.bias": torch.arange(10.0)}
    assert T.predict(cfg, bb, head, {}, {}, [2, 3], x).tolist() == [3] * 6
    assert T.predict(cfg, bb, head, {}, {}, list(range(10)), x).tolist() == [9] * 6


def test_warmup_row_sets_the_run_level_bgps_start_round():
    from fedta.methods import make_fedta

    def strategy(**rc):
        cfg = T.parse_config(rc)
        return make_fedta(cfg, backbone=None, x_surrogate=torch.zeros(1, 1, 28, 28))

    warm = strategy(method="fedta-warmup")
    assert METHODS["fedta-warmup"].kind == "reconstruction"
    assert warm.bgps_start_round == 4 and warm.bgps_warmup == 1 and warm.use_bgps
    assert [warm.may_freeze(r) for r in range(1, 7)] == [False] * 3 + [True, False, True]
    assert strategy(method="fedta-warmup", **{"bgps-start-round": 7}).bgps_start_round == 7
    plain = strategy(method="fedta", **{"bgps-start-round": 7})  # read by the warm-up row only
    assert plain.bgps_start_round == 1 and plain.may_freeze(2)


def test_importing_the_server_app_imports_the_client_app_with_it():
    """The ServerApp module imports the method table (hence fedta.client_app) at import time, so
    the ServerApp never imports the ClientApp while Flower's engine loads it (a race that failed
    `flwr run`; see fedta/server_app.py)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; import fedta.server_app; "
        "m = sys.modules['fedta.client_app']; assert hasattr(m, 'app')"
    )
    app_dir = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=app_dir, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1500:]
