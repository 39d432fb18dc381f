"""Data sources behind one registry.

Every source returns a :class:`DataBundle` of numpy arrays (train and test split). Sources:

``fashion_mnist``
    Fashion-MNIST 60k/10k from the IDX gzip files of the Debian package ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist``) or any folder given by ``data_dir`` or the
    ``FLOWERBED_FMNIST_DIR`` environment variable. With ``download=True`` (users online) it falls
    back to torchvision's downloader.
``digits``, ``breast_cancer``, ``wine``
    scikit-learn's bundled sets, split 80/20 with a fixed, stratified seed.
``ldl/<NAME>``
    a label-distribution-learning ``.mat`` file (keys ``features`` and ``labels``) from the folder
    given by ``data_dir``, ``FLOWERBED_LDL_DIR`` or ``../shared/data/ldl`` beside the repository.
    Labels are distributions (rows sum to one); the split is 80/20 with a fixed seed.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_LDL_DIR = REPO_ROOT.parent / "shared" / "data" / "ldl"
SPLIT_SEED = 2024  # fixed train/test split seed for sources without an official test split


class DataError(ValueError):
    """A data source, data setting or partition request that cannot be met."""


@dataclass
class DataBundle:
    """Arrays of one dataset.

    ``y`` holds integer class labels (``kind == "classification"``) or label distributions
    of shape ``(n, num_classes)`` (``kind == "ldl"``).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    kind: str = "classification"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def hard_labels(self) -> np.ndarray:
        """Integer labels of the train split (argmax for label distributions)."""
        return self.y_train if self.kind == "classification" else self.y_train.argmax(1)


_REGISTRY: dict[str, Callable[..., DataBundle]] = {}


def register(name: str):
    """Register a loader ``fn(data_dir=None, download=False) -> DataBundle`` under ``name``."""

    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """Names accepted by :func:`load_dataset` (LDL files appear as ``ldl/<NAME>``)."""
    names = sorted(_REGISTRY)
    ldl_dir = _ldl_dir(None)
    if ldl_dir.is_dir():
        names += sorted(f"ldl/{p.stem}" for p in ldl_dir.glob("*.mat"))
    return names


_CACHE: dict[tuple, DataBundle] = {}
_FIELDS = ("x_train", "y_train", "x_test", "y_test")


def cache_dir() -> Path:
    """Where decoded datasets and partitions are cached (``FLOWERBED_CACHE``)."""
    return Path(os.environ.get("FLOWERBED_CACHE") or Path.home() / ".cache" / "flowerbed")


def load_dataset(
    name: str, data_dir: str | None = None, download: bool = False, mmap: bool = False
) -> DataBundle:
    """Load dataset ``name`` (see the module docstring); cached per process.

    With ``mmap=True`` the decoded arrays are saved once as ``.npy`` files under
    :func:`cache_dir` and memory-mapped read-only, so every process of a simulation (Ray actors,
    the ServerApp) shares one copy in the page cache instead of holding its own.

    Raises
    ------
    DataError
        If the name is unknown or the files are missing; the message names the value.
    """
    key = (name, data_dir or "", mmap)
    if key in _CACHE:
        return _CACHE[key]
    if mmap:
        _CACHE[key] = _load_mmap(name, data_dir, download)
        return _CACHE[key]
    if name.startswith("ldl/"):
        bundle = _load_ldl(name[4:], data_dir)
    elif name in _REGISTRY:
        bundle = _REGISTRY[name](data_dir=data_dir, download=download)
    else:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(available())}")
    _CACHE[key] = bundle
    return bundle


def _load_mmap(name: str, data_dir: str | None, download: bool) -> DataBundle:
    import hashlib
    import json

    tag = hashlib.sha1(f"{name}|{data_dir or ''}".encode()).hexdigest()[:10]
    folder = cache_dir() / "datasets" / f"{name.replace('/', '_')}-{tag}"
    meta = folder / "meta.json"
    if not meta.exists():
        bundle = load_dataset(name, data_dir, download)
        folder.mkdir(parents=True, exist_ok=True)
        for f in _FIELDS:
            tmp = folder / f"{f}.{os.getpid()}.tmp.npy"
            np.save(tmp, np.ascontiguousarray(getattr(bundle, f)))
            os.replace(tmp, folder / f"{f}.npy")
        info = {"name": bundle.name, "num_classes": bundle.num_classes, "kind": bundle.kind}
        tmp = folder / f"meta.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, meta)
    info = json.loads(meta.read_text())
    arrays = {f: np.load(folder / f"{f}.npy", mmap_mode="r") for f in _FIELDS}
    return DataBundle(info["name"], **arrays, num_classes=info["num_classes"], kind=info["kind"])


# ---------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fmnist_dir(data_dir: str | None = None) -> Path:
    return Path(data_dir or os.environ.get("FLOWERBED_FMNIST_DIR") or DEFAULT_FMNIST_DIR)


@register("fashion_mnist")
def load_fashion_mnist(data_dir: str | None = None, download: bool = False) -> DataBundle:
    """Fashion-MNIST as float32 images ``(n, 1, 28, 28)`` scaled to [0, 1]."""
    root = fmnist_dir(data_dir)
    files = {
        "xtr": "train-images-idx3-ubyte.gz",
        "ytr": "train-labels-idx1-ubyte.gz",
        "xte": "t10k-images-idx3-ubyte.gz",
        "yte": "t10k-labels-idx1-ubyte.gz",
    }
    if not all((root / f).exists() for f in files.values()):
        if not download:
            raise DataError(
                f"Fashion-MNIST IDX files not found in {str(root)!r}: install the Debian package "
                "`dataset-fashion-mnist`, set FLOWERBED_FMNIST_DIR, or pass download=True"
            )
        root = _download_fmnist(root)
    arr = {k: _read_idx(root / f) for k, f in files.items()}
    return DataBundle(
        name="fashion_mnist",
        x_train=(arr["xtr"].astype(np.float32) / 255.0)[:, None],
        y_train=arr["ytr"].astype(np.int64),
        x_test=(arr["xte"].astype(np.float32) / 255.0)[:, None],
        y_test=arr["yte"].astype(np.int64),
        num_classes=10,
    )


def _download_fmnist(root: Path) -> Path:  # pragma: no cover - needs the network
    from torchvision.datasets import FashionMNIST

    target = Path(os.environ.get("FLOWERBED_CACHE", Path.home() / ".cache" / "flowerbed"))
    FashionMNIST(str(target), download=True)
    return target / "FashionMNIST" / "raw"


# ---------------------------------------------------------------- scikit-learn
def _split(x, y, num_classes, name, kind="classification", stratify=True) -> DataBundle:
    from sklearn.model_selection import train_test_split

    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=y if stratify else None
    )
    return DataBundle(name, xtr, ytr, xte, yte, num_classes, kind)


def _sklearn(loader_name: str, image: bool = False):
    def load(data_dir: str | None = None, download: bool = False) -> DataBundle:
        import sklearn.datasets

        ds = getattr(sklearn.datasets, loader_name)()
        x = ds.data.astype(np.float32)
        if image:  # 8x8 digits, values 0..16
            x = (x / 16.0).reshape(-1, 1, 8, 8)
        y = ds.target.astype(np.int64)
        bundle = _split(x, y, int(y.max()) + 1, loader_name.removeprefix("load_"))
        if not image:  # standardise tabular features with train-split statistics
            mu, sd = bundle.x_train.mean(0), bundle.x_train.std(0) + 1e-8
            bundle.x_train = ((bundle.x_train - mu) / sd).astype(np.float32)
            bundle.x_test = ((bundle.x_test - mu) / sd).astype(np.float32)
        return bundle

    return load


register("digits")(_sklearn("load_digits", image=True))
register("breast_cancer")(_sklearn("load_breast_cancer"))
register("wine")(_sklearn("load_wine"))


# ---------------------------------------------------------------- LDL .mat files
def _ldl_dir(data_dir: str | None) -> Path:
    return Path(data_dir or os.environ.get("FLOWERBED_LDL_DIR") or DEFAULT_LDL_DIR)


def _load_ldl(stem: str, data_dir: str | None) -> DataBundle:
    import scipy.io

    path = _ldl_dir(data_dir) / f"{stem}.mat"
    if not path.exists():
        raise DataError(
            f"LDL dataset {stem!r} not found at {str(path)!r}; set FLOWERBED_LDL_DIR or data_dir"
        )
    mat = scipy.io.loadmat(path)
    x = np.asarray(mat["features"], dtype=np.float32)
    d = np.asarray(mat["labels"], dtype=np.float64)
    d = np.clip(d, 0, None)
    d = (d / d.sum(1, keepdims=True)).astype(np.float32)
    bundle = _split(x, d, d.shape[1], f"ldl/{stem}", kind="ldl", stratify=False)
    mu, sd = bundle.x_train.mean(0), bundle.x_train.std(0) + 1e-8
    bundle.x_train = ((bundle.x_train - mu) / sd).astype(np.float32)
    bundle.x_test = ((bundle.x_test - mu) / sd).astype(np.float32)
    return bundle
