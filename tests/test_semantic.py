"""The semantic partitioner (flowerbed.common.semantic): KL by hand, the Hungarian matching on a
hand-made case, label balance, reproducibility, and the registered name on digits."""

import numpy as np
import pytest
from datasets import Dataset

from flowerbed.common import semantic as S
from flowerbed.common.partition import data_options, partition_indices, partitioners


def test_kl_diag_by_hand():
    # KL(N(0,1) || N(1,2)) in 1-d = 0.5 * (log 2 + (1 + 1) / 2 - 1) = 0.5 log 2
    kl = S.kl_diag_gaussians(np.zeros(1), np.ones(1), np.ones(1), np.full(1, 2.0))
    assert kl == pytest.approx(0.5 * np.log(2.0))
    assert S.kl_diag_gaussians(np.ones(3), np.ones(3), np.ones(3), np.ones(3)) == 0.0
    # asymmetric: KL(N(1,2) || N(0,1)) = 0.5 * (log 1/2 + (2 + 1) - 1)
    back = S.kl_diag_gaussians(np.ones(1), np.full(1, 2.0), np.zeros(1), np.ones(1))
    assert back == pytest.approx(0.5 * (np.log(0.5) + 2.0))


def test_matching_pairs_the_close_components():
    # 3 labels x 3 components at 0, 10, 20 (listed in a different order per label): the
    # matching must give each client the components at the same place for every label
    where = {0: [0.0, 10.0, 20.0], 1: [20.0, 0.0, 10.0], 2: [10.0, 20.0, 0.0]}
    means = {y: np.array([[m, m] for m in ms]) for y, ms in where.items()}
    variances = {y: np.ones((3, 2)) for y in where}
    for seed in range(5):  # any anchor and order
        perm = S.match_components(means, variances, seed)
        for c in range(3):
            centres = {where[y][perm[y][c]] for y in where}
            assert len(centres) == 1, (seed, c, perm)


def test_matching_is_hungarian_not_greedy():
    # 1-d, unit variances: KL = 0.5 (m0 - m1)^2. Label 0 at 0 and 2, label 1 at 1 and -1.5.
    # Greedy from component 0 takes 1 (0.5), leaving 2 <-> -1.5 (6.125): total 6.625. The
    # optimum is 0 <-> -1.5 (1.125) and 2 <-> 1 (0.5): total 1.625.
    means = {0: np.array([[0.0], [2.0]]), 1: np.array([[1.0], [-1.5]])}
    variances = {0: np.ones((2, 1)), 1: np.ones((2, 1))}
    k = S.kl_matrix(means[0], variances[0], means[1], variances[1])
    assert k == pytest.approx(0.5 * np.array([[1.0, 2.25], [1.0, 12.25]]))
    for seed in range(4):  # either label as the anchor
        perm = S.match_components(means, variances, seed=seed)
        pairs = {(means[0][perm[0][c]][0], means[1][perm[1][c]][0]) for c in range(2)}
        assert pairs == {(0.0, -1.5), (2.0, 1.0)}, seed


def _blobs(seed=0, n=60, clients=3, labels=4):
    """Per label, ``clients`` well-separated blobs at the same centres for every label."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [30.0, 0.0], [0.0, 30.0], [30.0, 30.0]])[:clients]
    z, y, blob = [], [], []
    for lab in range(labels):
        for b in range(clients):
            z.append(centres[b] + rng.normal(size=(n, 2)))
            y += [lab] * n
            blob += [b] * n
    return np.concatenate(z), np.array(y), np.array(blob)


def _partition(z, y, clients, seed):
    part = S.SemanticPartitioner(clients, z, seed=seed)
    part.dataset = Dataset.from_dict({"label": y, "idx": np.arange(len(y))})
    return [np.asarray(part.load_partition(c)["idx"]) for c in range(clients)]


def test_semantic_partitions_balanced_coherent_reproducible():
    z, y, blob = _blobs()
    parts = _partition(z, y, 3, seed=1)
    allidx = np.concatenate(parts)
    assert sorted(allidx) == list(range(len(y)))  # disjoint and complete
    for p in parts:
        assert np.bincount(y[p], minlength=4).tolist() == [60] * 4  # every label, balanced
        assert len(set(blob[p])) == 1  # one semantic blob per client, across all labels
    again = _partition(z, y, 3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_semantic_differs_from_a_random_matching():
    # the matching is what makes clients coherent: with shuffled components (a forced random
    # matching) a client mixes blobs
    z, y, blob = _blobs()
    part = S.SemanticPartitioner(3, z, seed=1)
    part.dataset = Dataset.from_dict({"label": y, "idx": np.arange(len(y))})
    part.load_partition(0)
    assert set(part.matching) == {0, 1, 2, 3}
    assert all(sorted(p.tolist()) == [0, 1, 2] for p in part.matching.values())


def test_registered_semantic_on_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWERBED_CACHE", str(tmp_path))
    from flowerbed.common.data import load_dataset

    assert "semantic" in partitioners()
    assert data_options("dirichlet", "digits") == {}  # other partitioners' keys unchanged
    bundle = load_dataset("digits")
    opts = data_options("semantic", "digits")
    parts = partition_indices(bundle.hard_labels, 4, "semantic", seed=3, **opts)
    assert sorted(np.concatenate(parts)) == list(range(len(bundle.y_train)))
    hist = np.stack([np.bincount(bundle.y_train[p], minlength=10) for p in parts])
    assert (hist > 0).all()  # every client holds every label
    assert (tmp_path / "semantic").is_dir()  # the embedder's output is cached
    again = partition_indices(bundle.hard_labels, 4, "semantic", seed=3, **opts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(bundle.hard_labels, 4, "semantic", seed=4, **opts)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_semantic_without_dataset_names_the_fix():
    from flowerbed.common.data import DataError

    with pytest.raises(DataError, match="partitioner 'semantic' needs the dataset"):
        partition_indices(np.repeat(np.arange(3), 10), 2, "semantic", seed=0)


def test_semantic_cnn_on_digits_own_cache_and_partition(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWERBED_CACHE", str(tmp_path))
    from flowerbed.common.data import DataError, load_dataset
    from flowerbed.common.semantic import embeddings

    assert "semantic-cnn" in partitioners()
    bundle = load_dataset("digits")
    opts = data_options("semantic-cnn", "digits")
    assert opts == data_options("semantic", "digits")
    cnn = partition_indices(bundle.hard_labels, 4, "semantic-cnn", seed=3, **opts)
    assert sorted(np.concatenate(cnn)) == list(range(len(bundle.y_train)))
    hist = np.stack([np.bincount(bundle.y_train[p], minlength=10) for p in cnn])
    assert (hist > 0).all()  # label-balanced like semantic
    again = partition_indices(bundle.hard_labels, 4, "semantic-cnn", seed=3, **opts)
    assert all(np.array_equal(a, b) for a, b in zip(cnn, again, strict=True))
    mlp = partition_indices(bundle.hard_labels, 4, "semantic", seed=3, **opts)
    assert not all(np.array_equal(a, b) for a, b in zip(cnn, mlp, strict=True))
    files = sorted((tmp_path / "semantic").glob("digits-*.npy"))
    assert len(files) == 2  # one cache file per embedder
    z_cnn, z_mlp = embeddings("digits", embedder="cnn"), embeddings("digits")
    assert z_cnn.shape == z_mlp.shape == (len(bundle.y_train), 32)
    assert not np.allclose(z_cnn, z_mlp)
    with pytest.raises(DataError, match="semantic embedder 'vit'"):
        embeddings("digits", embedder="vit")
    with pytest.raises(DataError, match="partitioner 'semantic-cnn' needs the dataset"):
        partition_indices(np.repeat(np.arange(3), 10), 2, "semantic-cnn", seed=0)


def test_semantic_mlp_cache_key_unchanged(tmp_path, monkeypatch):
    """The default embedder keeps the cache file name it had before the ``embedder`` option
    (so existing caches and the runs built on them stay valid)."""
    import hashlib

    monkeypatch.setenv("FLOWERBED_CACHE", str(tmp_path))
    from flowerbed.common.semantic import embeddings

    embeddings("digits")
    tag = hashlib.sha1(b"digits||32|5|v1").hexdigest()[:10]
    assert (tmp_path / "semantic" / f"digits-{tag}.npy").exists()


def test_semantic_pixels_is_pca_of_the_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWERBED_CACHE", str(tmp_path))
    from sklearn.decomposition import PCA

    from flowerbed.common.data import load_dataset
    from flowerbed.common.semantic import embeddings

    bundle = load_dataset("digits")
    x = bundle.x_train.reshape(len(bundle.x_train), -1).astype(np.float32)
    want = PCA(n_components=32, random_state=0).fit_transform(x - x.mean(0))
    np.testing.assert_allclose(embeddings("digits", embedder="pixels"), want, atol=1e-4)
    opts = data_options("semantic-pixels", "digits")
    parts = partition_indices(bundle.hard_labels, 4, "semantic-pixels", seed=3, **opts)
    hist = np.stack([np.bincount(bundle.y_train[p], minlength=10) for p in parts])
    assert (hist > 0).all()
