"""FedDistr app: run-config schema, data splits, partitions, client and server steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowerbed.common.data import load_dataset

SPLIT_SEED = 2024  # fixed public/private split of the Fashion-MNIST train set


def load_fmnist(data_dir: str = ""):
    return load_dataset("fashion_mnist", data_dir or None, mmap=True)


def split_indices(n: int, public_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(public, private) indices of the train split: a fixed permutation, public first.

    The public part pre-trains the generator (images only); clients draw from the private part.
    """
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(perm[:public_size]), perm[public_size:]


def save_grid(rows: list[torch.Tensor], path: str | Path, labels: list[str] | None = None) -> Path:
    """PNG grid: one row per tensor of images ``(k, 1, 28, 28)`` (optionally labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(ncol * 0.8, len(rows) * 0.85), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(r):
                ax.imshow(r[j, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        if labels:
            axes[i][0].set_title(labels[i], fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- run config
from typing import Any  # noqa: E402

from flowerbed.common import config as C  # noqa: E402

METHODS = ("feddistr", "fedavg", "fedprox", "centralized")
PARTITIONS = ("disentangled", "near", "entangled")

SCHEMA: dict[str, C.Option] = {
    "method": C.Option("feddistr", choices=METHODS),
    "num-server-rounds": C.Option(50, C.positive, "FedAvg/FedProx rounds > 0"),
    "proximal-mu": C.Option(0.01, C.non_negative, "FedProx mu >= 0"),
    "partition": C.Option("disentangled", choices=PARTITIONS),
    "xi": C.Option(0.1, lambda v: 0 <= v < 1, "xi in [0, 1)"),
    "alpha": C.Option(0.5, C.positive, "Dirichlet alpha > 0"),
    "train-size": C.Option(3000, C.positive, "number of private training images > 0"),
    "test-size": C.Option(5000, C.positive, "number of test images > 0"),
    "data-dir": C.Option(""),
    "generator": C.Option("default", choices=("default", "tiny")),
    "clusters-per-class": C.Option(3, C.positive, "k-means clusters per local class > 0"),
    "inversion-steps": C.Option(0, C.non_negative, "inversion steps >= 0"),
    "inversion-lr": C.Option(0.05, C.positive, "inversion learning rate > 0"),
    "match-threshold": C.Option(0.5, lambda v: -1 <= v <= 1, "cosine threshold in [-1, 1]"),
    "match-same-label": C.Option(True),
    "synthetic-per-class": C.Option(200, C.positive, "synthetic images per class > 0"),
    "ddim-steps": C.Option(20, C.positive, "DDIM steps > 0"),
    "guidance": C.Option(1.0, C.non_negative, "guidance scale >= 0"),
    "model": C.Option("cnn", choices=("cnn", "mlp")),
    "local-epochs": C.Option(1, C.positive, "local epochs > 0"),
    "batch-size": C.Option(32, C.positive, "batch size > 0"),
    "lr": C.Option(0.05, C.positive, "learning rate > 0"),
    "server-epochs": C.Option(15, C.positive, "epochs on the synthetic / pooled set > 0"),
    "save-samples": C.Option(True),
    "seed": C.Option(42),
    "results-dir": C.Option(""),
    "device": C.Option("auto", choices=("auto", "cpu", "cuda")),
}


def parse_config(run_config) -> dict[str, Any]:
    """Validate the run config (one-line :class:`~flowerbed.common.config.ConfigError`)."""
    cfg = C.parse(run_config, SCHEMA)
    n_train = 60000 - gen_config(cfg).public_size
    if cfg["train-size"] > n_train:
        raise C.ConfigError(
            f"run config train-size={cfg['train-size']}: larger than the private pool ({n_train})"
        )
    if cfg["test-size"] > 10000:
        raise C.ConfigError(f"run config test-size={cfg['test-size']}: at most 10000")
    return cfg


def gen_config(cfg: dict[str, Any]):
    from feddistr.generator import TINY, GenConfig

    return TINY if cfg["generator"] == "tiny" else GenConfig()


# ---------------------------------------------------------------- partitions
def disentangled(labels: np.ndarray, k: int, seed: int, num_classes: int = 10) -> list[np.ndarray]:
    """Each class on exactly one client: classes shuffled by ``seed`` and split into ``k``
    groups (``k <= num_classes``)."""
    if k > num_classes:
        raise ValueError(f"disentangled partition: {k} clients > {num_classes} classes")
    classes = np.random.default_rng(seed).permutation(num_classes)
    groups = np.array_split(classes, k)
    return [np.flatnonzero(np.isin(labels, g)) for g in groups]


def near_disentangled(
    labels: np.ndarray, k: int, seed: int, xi: float, num_classes: int = 10
) -> list[np.ndarray]:
    """xi-entangled: a class's samples go to its owner client (the disentangled assignment) with
    probability ``1 - xi`` and to a uniformly drawn other client with probability ``xi``."""
    owner_parts = disentangled(labels, k, seed, num_classes)
    owner = np.empty(len(labels), np.int64)
    for c, idx in enumerate(owner_parts):
        owner[idx] = c
    rng = np.random.default_rng(seed + 1)
    dest = owner.copy()
    if k > 1:
        move = rng.random(len(labels)) < xi
        other = rng.integers(0, k - 1, len(labels))
        other = other + (other >= owner)  # uniform over the k-1 other clients
        dest[move] = other[move]
    return [np.flatnonzero(dest == c) for c in range(k)]


def make_partitions(cfg: dict[str, Any], labels: np.ndarray, k: int) -> list[np.ndarray]:
    if k > len(labels):
        raise ValueError(f"{k} partitions > {len(labels)} training images (train-size)")
    if cfg["partition"] == "disentangled":
        return disentangled(labels, k, cfg["seed"])
    if cfg["partition"] == "near":
        return near_disentangled(labels, k, cfg["seed"], cfg["xi"])
    from flowerbed.common.partition import partition_indices

    return partition_indices(labels, k, "dirichlet", seed=cfg["seed"], alpha=cfg["alpha"])


def private_pool(cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the private pool the clients share out (disjoint from the public split)."""
    bundle = load_fmnist(cfg["data-dir"])
    _, priv = split_indices(len(bundle.y_train), gen_config(cfg).public_size)
    idx = np.sort(priv[: cfg["train-size"]])
    return np.asarray(bundle.x_train[idx], np.float32), np.asarray(bundle.y_train[idx], np.int64)


def client_data(cfg: dict[str, Any], pid: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = private_pool(cfg)
    idx = make_partitions(cfg, y, k)[pid]
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def test_data(cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    bundle = load_fmnist(cfg["data-dir"])
    n = cfg["test-size"]
    return (
        torch.from_numpy(np.array(bundle.x_test[:n], np.float32)),
        torch.from_numpy(np.array(bundle.y_test[:n], np.int64)),
    )


def label_histograms(cfg: dict[str, Any], k: int) -> list[list[int]]:
    _, y = private_pool(cfg)
    return [np.bincount(y[p], minlength=10).tolist() for p in make_partitions(cfg, y, k)]


# ---------------------------------------------------------------- models
def make_model(cfg: dict[str, Any]) -> torch.nn.Module:
    from flowerbed.common.models import build_model
    from flowerbed.common.seeding import derive_seed, set_seed

    set_seed(derive_seed(cfg["seed"], 0xFFFF))
    return build_model(cfg["model"], (1, 28, 28), 10)


# ---------------------------------------------------------------- FedDistr client step
def client_upload(cfg: dict[str, Any], pid: int, k: int) -> tuple[dict[str, np.ndarray], dict]:
    """Split local data into base distributions and fit one Gaussian condition per cluster.

    Per local class: k-means (``clusters-per-class``) on the semantic codes ``mu(x)`` of the
    frozen generator; per cluster, the moments of the codes (plus the encoder noise) give
    ``(m, log s)``; ``m`` is then refined by :func:`feddistr.generator.invert`
    (textual-inversion style, ``s`` kept) for ``inversion-steps`` steps. Returns the arrays to
    upload and metrics.
    """
    from sklearn.cluster import KMeans

    from feddistr.generator import invert, load_or_build
    from flowerbed.common.seeding import derive_seed

    seed = derive_seed(cfg["seed"], pid, 1)
    torch.manual_seed(seed)
    x, y = client_data(cfg, pid, k)
    gen = load_or_build(gen_config(cfg), cfg["data-dir"])
    with torch.no_grad():
        mu, logvar = [], []
        for i in range(0, len(x), 512):
            a, b = gen.sem(x[i : i + 512])
            mu.append(a)
            logvar.append(b)
        mu, logvar = torch.cat(mu), torch.cat(logvar)
    cluster = torch.empty(len(x), dtype=torch.long)
    labels, counts, means, logstds = [], [], [], []
    for c in sorted(set(y.tolist())):
        idx = torch.nonzero(y == c).flatten()
        n_k = min(cfg["clusters-per-class"], len(idx))
        if n_k > 1:
            km = KMeans(n_clusters=n_k, n_init=3, random_state=seed % 2**31)
            sub = torch.from_numpy(km.fit_predict(mu[idx].numpy())).long()
        else:
            sub = torch.zeros(len(idx), dtype=torch.long)
        for j in range(n_k):
            members = idx[sub == j]
            if len(members) == 0:
                continue
            cluster[members] = len(labels)
            m = mu[members]
            var = m.var(0, unbiased=False) + logvar[members].exp().mean(0)
            labels.append(c)
            counts.append(len(members))
            means.append(m.mean(0))
            logstds.append(0.5 * var.clamp_min(1e-6).log())
    z0 = gen.latents(x)
    g = torch.Generator().manual_seed(seed)
    mean, logstd, loss = invert(
        gen,
        z0,
        cluster,
        torch.stack(means),
        torch.stack(logstds),
        cfg["inversion-steps"],
        lr=cfg["inversion-lr"],
        generator=g,
    )
    arrays = {
        "mean": mean.numpy().astype(np.float32),
        "logstd": logstd.numpy().astype(np.float32),
        "label": np.asarray(labels, np.int64),
        "count": np.asarray(counts, np.int64),
    }
    return arrays, {"num-examples": len(x), "num-distributions": len(labels), "inv-loss": loss}


def check_upload(arrays: dict[str, np.ndarray], cond_dim: int, num_classes: int = 10) -> str | None:
    """Why an upload must be rejected, or None."""
    for key in ("mean", "logstd", "label", "count"):
        if key not in arrays:
            return f"upload lacks array {key!r}"
    m, s, lab, cnt = (arrays[k] for k in ("mean", "logstd", "label", "count"))
    if m.ndim != 2 or m.shape[1] != cond_dim or s.shape != m.shape:
        return f"mean/logstd have shapes {m.shape}/{s.shape}, expected (k, {cond_dim})"
    if lab.shape != (len(m),) or cnt.shape != (len(m),):
        return f"label/count have shapes {lab.shape}/{cnt.shape}, expected ({len(m)},)"
    if not (np.isfinite(m).all() and np.isfinite(s).all()):
        return "mean/logstd contain NaN or Inf"
    if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
        return f"labels outside [0, {num_classes})"
    if len(cnt) and cnt.min() <= 0:
        return "counts must be positive"
    return None
