"""Partitioning with flwr-datasets' partitioners on local arrays."""

import numpy as np
import pytest

from flowerbed.common.data import DataError
from flowerbed.common.partition import label_histograms, partition_indices


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWERBED_CACHE", str(tmp_path))


LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes


def _is_partition(parts, n):
    allidx = np.concatenate(parts)
    return len(allidx) == n and len(np.unique(allidx)) == n


def test_iid_covers_all_once_and_balanced():
    parts = partition_indices(LABELS, 10, "iid", seed=1)
    assert _is_partition(parts, 1000)
    assert {len(p) for p in parts} == {100}


def test_dirichlet_is_skewed_and_seeded():
    a = partition_indices(LABELS, 5, "dirichlet", seed=3, alpha=0.1, min_partition_size=5)
    b = partition_indices(LABELS, 5, "dirichlet", seed=3, alpha=0.1, min_partition_size=5)
    c = partition_indices(LABELS, 5, "dirichlet", seed=4, alpha=0.1, min_partition_size=5)
    assert _is_partition(a, 1000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    hist = label_histograms(LABELS, a, 10)
    # strong skew: each client's largest class holds well over the IID share of 10%
    assert (hist.max(1) / hist.sum(1)).mean() > 0.3
    assert hist.sum() == 1000


def test_pathological_gives_k_classes_per_client():
    parts = partition_indices(LABELS, 5, "pathological", seed=0, classes_per_partition=2)
    hist = label_histograms(LABELS, parts, 10)
    assert ((hist > 0).sum(1) <= 2).all()


def test_more_partitions_than_samples_is_a_clear_error():
    with pytest.raises(DataError, match="num_partitions=2000 is larger than the data"):
        partition_indices(LABELS, 2000, "iid")


def test_unknown_scheme_and_bad_count():
    with pytest.raises(DataError, match="unknown partitioner 'zipf'"):
        partition_indices(LABELS, 2, "zipf")
    with pytest.raises(DataError, match="positive integer"):
        partition_indices(LABELS, 0, "iid")


def test_unmeetable_dirichlet_is_a_clear_error():
    tiny = np.array([0, 1, 0, 1, 0, 1])
    with pytest.raises(DataError, match="cannot be met"):
        partition_indices(tiny, 3, "dirichlet", seed=0, alpha=0.5, min_partition_size=5)


def test_registered_partitioner_is_used_and_validated(tmp_path, monkeypatch):
    from flwr_datasets.partitioner import Partitioner

    from flowerbed.common import config as C
    from flowerbed.common.partition import partitioners, register_partitioner

    monkeypatch.setenv("FLOWERBED_CACHE", str(tmp_path))

    class FirstHalf(Partitioner):
        """Partition 0 holds label 0, partition 1 the rest."""

        def __init__(self, num_partitions: int):
            super().__init__()
            self._n = num_partitions

        @property
        def num_partitions(self) -> int:
            return self._n

        def load_partition(self, partition_id: int):
            labels = np.asarray(self.dataset["label"])
            keep = np.flatnonzero((labels == 0) == (partition_id == 0))
            return self.dataset.select(keep.tolist())

    def factory(num_partitions, seed, **_):
        return FirstHalf(num_partitions)

    register_partitioner("test-first-half", factory)
    assert "test-first-half" in partitioners()
    parts = partition_indices(LABELS, 2, "test-first-half", seed=0)
    assert set(LABELS[parts[0]]) == {0} and 0 not in set(LABELS[parts[1]])
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(LABELS)))
    # the run-config key `partitioner` takes any registered name, and names the bad one
    schema = C.compose(C.DATA)
    assert C.parse({"partitioner": "test-first-half"}, schema)["partitioner"] == "test-first-half"
    with pytest.raises(C.ConfigError, match="partitioner='zipf': must be one of .*test-first-half"):
        C.parse({"partitioner": "zipf"}, schema)
    with pytest.raises(ValueError, match="already registered"):
        register_partitioner("iid", factory)


# ----------------------------------------------------------- label-dirichlet (Yuan et al.)
SKEWED = np.repeat([0, 1, 2, 3], [700, 150, 100, 50])  # 1000 samples, prior .7/.15/.1/.05


def test_label_dirichlet_sizes_and_concentration_by_hand():
    from flowerbed.common.label_dirichlet import LabelDirichletPartitioner

    sizes, conc = LabelDirichletPartitioner(3, alpha=2.0).sizes_and_concentration(SKEWED)
    assert sizes.tolist() == [334, 333, 333]  # 1000 // 3, the remainder one each to the first
    np.testing.assert_allclose(conc, [1.4, 0.3, 0.2, 0.1])  # alpha x prior, total alpha


def test_label_dirichlet_equal_sizes_cover_all_and_seeded():
    a = partition_indices(SKEWED, 8, "label-dirichlet", seed=5, alpha=1.0)
    b = partition_indices(SKEWED, 8, "label-dirichlet", seed=5, alpha=1.0)
    c = partition_indices(SKEWED, 8, "label-dirichlet", seed=6, alpha=1.0)
    assert _is_partition(a, 1000)
    assert {len(p) for p in a} == {125}
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_label_dirichlet_proportions_follow_the_prior_at_large_alpha():
    labels = np.repeat([0, 1, 2, 3], [7000, 1500, 1000, 500])
    parts = partition_indices(labels, 10, "label-dirichlet", seed=0, alpha=1e4)
    share = label_histograms(labels, parts, 4) / 1000
    # every client's label mix is the prior (a concentration of 1e4 x prior: sd ~ 0.005)
    np.testing.assert_allclose(share, np.tile([0.7, 0.15, 0.1, 0.05], (10, 1)), atol=0.03)


def test_label_dirichlet_small_alpha_is_skewed_and_does_not_stop():
    labels = np.repeat(np.arange(10), 200)
    # alpha 0.1 = 0.01 per label: the drawn multinomials are one-hot up to underflow; a client
    # whose label runs out goes on with the labels left (the authors' code stops on 0/0 there)
    parts = partition_indices(labels, 20, "label-dirichlet", seed=1, alpha=0.1)
    assert _is_partition(parts, 2000)
    assert {len(p) for p in parts} == {100}
    hist = label_histograms(labels, parts, 10)
    assert (hist.max(1) / 100).mean() > 0.5  # IID would give ~0.15
    iid = partition_indices(labels, 20, "label-dirichlet", seed=1, alpha=1e4)
    assert (label_histograms(labels, iid, 10).max(1) / 100).mean() < 0.2


def test_label_dirichlet_rejects_gapped_labels():
    with pytest.raises(DataError, match="labels must be 0..K-1"):
        partition_indices(np.repeat([0, 2], 50), 2, "label-dirichlet", seed=0, alpha=1.0)


def test_generated_partitioner_carries_only_the_count_and_serves_several_names():
    from flowerbed.common.partition import (
        GeneratedPartitioner,
        generated_partitioner,
        partitioner_factory,
        register_partitioner,
    )

    p = generated_partitioner(7, seed=3, alpha=0.5)  # options it does not use are ignored
    assert isinstance(p, GeneratedPartitioner) and p.num_partitions == 7
    register_partitioner("test-generated-a", generated_partitioner)
    register_partitioner("test-generated-b", generated_partitioner)  # same factory, two names
    assert partitioner_factory("test-generated-b") is generated_partitioner
