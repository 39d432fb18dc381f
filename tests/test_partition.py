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
    with pytest.raises(DataError, match="unknown partition scheme 'zipf'"):
        partition_indices(LABELS, 2, "zipf")
    with pytest.raises(DataError, match="positive integer"):
        partition_indices(LABELS, 0, "iid")


def test_unmeetable_dirichlet_is_a_clear_error():
    tiny = np.array([0, 1, 0, 1, 0, 1])
    with pytest.raises(DataError, match="cannot be met"):
        partition_indices(tiny, 3, "dirichlet", seed=0, alpha=0.5, min_partition_size=5)
