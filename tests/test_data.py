"""Data sources: Fashion-MNIST IDX files, sklearn sets, LDL files, memory-mapped cache."""

import numpy as np
import pytest

from flowerbed.common.data import DataError, available, load_dataset


def test_fashion_mnist_shapes_and_range():
    b = load_dataset("fashion_mnist")
    assert b.x_train.shape == (60000, 1, 28, 28) and b.x_test.shape == (10000, 1, 28, 28)
    assert b.x_train.dtype == np.float32 and 0.0 <= b.x_train.min() and b.x_train.max() <= 1.0
    assert sorted(np.unique(b.y_train)) == list(range(10))
    assert np.bincount(b.y_test).tolist() == [1000] * 10  # the official balanced test split


def test_mmap_equals_in_memory(tmp_path, monkeypatch):
    import flowerbed.common.data as data

    monkeypatch.setenv("FLOWERBED_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_CACHE", {})  # earlier tests may have loaded it from elsewhere
    a = load_dataset("digits")
    m = load_dataset("digits", mmap=True)
    assert isinstance(m.x_train, np.memmap)
    np.testing.assert_array_equal(a.x_train, m.x_train)
    np.testing.assert_array_equal(a.y_test, m.y_test)
    assert list(tmp_path.rglob("x_train.npy"))


def test_sklearn_sets():
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.num_classes == 10
    bc = load_dataset("breast_cancer")
    assert bc.num_classes == 2 and len(bc.x_train) + len(bc.x_test) == 569
    assert abs(float(bc.x_train.mean())) < 1e-4  # standardised with train statistics


def test_ldl_file_loads_as_distributions():
    b = load_dataset("ldl/SJAFFE")
    assert b.kind == "ldl" and b.num_classes == 6
    assert len(b.x_train) + len(b.x_test) == 213
    np.testing.assert_allclose(b.y_train.sum(1), 1.0, atol=1e-5)
    assert "ldl/SBU_3DFE" in available()


def test_unknown_dataset_names_the_value():
    with pytest.raises(DataError, match="unknown dataset 'cifar11'"):
        load_dataset("cifar11")
    with pytest.raises(DataError, match="'NoSuchSet'"):
        load_dataset("ldl/NoSuchSet")


def test_missing_fmnist_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="Fashion-MNIST IDX files not found"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))
