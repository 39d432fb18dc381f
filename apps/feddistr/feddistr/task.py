"""FedDistr app: run-config schema, data splits, partitioners, models and the client steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr_datasets.partitioner import Partitioner

from flowerbed.common import config as C
from flowerbed.common.client import partition_of, sgd_step
from flowerbed.common.data import SPLIT_SEED, load_dataset
from flowerbed.common.models import build_model
from flowerbed.common.partition import (
    partition_indices,
    partitioner_factory,
    register_partitioner,
)
from flowerbed.common.records import load_record, reply, to_record
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.train import evaluate, get_device, train


def load_fmnist(data_dir: str = ""):
    return load_dataset("fashion_mnist", data_dir or None, mmap=True)


def split_indices(n: int, public_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(public, private) indices of the train split: a fixed permutation (``SPLIT_SEED``),
    public first.

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
SCHEMA: dict[str, C.Option] = C.compose(
    *C.STANDARD,
    {
        "method": C.Option("feddistr"),  # choices from the method table (feddistr.methods)
        "xi": C.Option(0.1, lambda v: 0 <= v < 1, "xi in [0, 1)"),
        "train-size": C.Option(3000, C.positive, "number of private training images > 0"),
        "test-size": C.Option(5000, C.positive, "number of test images > 0"),
        "generator": C.Option("default", choices=("default", "tiny")),
        "clusters-per-class": C.Option(3, C.positive, "k-means clusters per local class > 0"),
        "inversion-steps": C.Option(100, C.non_negative, "inversion steps >= 0"),
        "inversion-lr": C.Option(0.01, C.positive, "inversion learning rate > 0"),
        "match-threshold": C.Option(0.5, lambda v: -1 <= v <= 1, "cosine threshold in [-1, 1]"),
        "match-same-label": C.Option(True),
        "synthetic-per-class": C.Option(200, C.positive, "synthetic images per class > 0"),
        "ddim-steps": C.Option(20, C.positive, "DDIM steps > 0"),
        "guidance": C.Option(1.0, C.non_negative, "guidance scale >= 0"),
        "model": C.Option("cnn", choices=("cnn", "mlp")),
        "server-epochs": C.Option(15, C.positive, "epochs on the synthetic / pooled set > 0"),
        "save-samples": C.Option(True),
    },
    num_server_rounds=50,
    partitioner="disentangled",
    lr=0.05,
)


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one-line :class:`~flowerbed.common.config.ConfigError`) and
    resolve ``method`` in the app's method table."""
    from feddistr.methods import METHODS

    cfg = C.parse(run_config, {**SCHEMA, "method": METHODS.option("feddistr")}, methods=METHODS)
    if cfg["dataset"] != "fashion_mnist":
        raise C.ConfigError(
            f"run config dataset={cfg['dataset']!r}: FedDistr runs on fashion_mnist"
        )
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


# ---------------------------------------------------------------- partitioners
class DisentangledPartitioner(Partitioner):
    """Each class on exactly one client: classes shuffled by ``seed`` and split into
    ``num_partitions`` groups (``num_partitions <= num_classes``).

    With ``xi > 0`` (xi-entangled, the ``near`` partitioner) a sample goes to its class's owner
    with probability ``1 - xi`` and to a uniformly drawn other client with probability ``xi``.
    """

    def __init__(
        self,
        num_partitions: int,
        seed: int,
        xi: float = 0.0,
        num_classes: int = 10,
        partition_by: str = "label",
    ) -> None:
        super().__init__()
        if num_partitions > num_classes:
            raise ValueError(
                f"disentangled partition: {num_partitions} clients > {num_classes} classes"
            )
        self._num_partitions = num_partitions
        self.seed = seed
        self.xi = xi
        self.num_classes = num_classes
        self.partition_by = partition_by
        self._parts: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def owners(self, labels: np.ndarray) -> np.ndarray:
        """Client that owns each sample's class."""
        k = self._num_partitions
        classes = np.random.default_rng(self.seed).permutation(self.num_classes)
        owner_of_class = np.empty(self.num_classes, np.int64)
        for c, group in enumerate(np.array_split(classes, k)):
            owner_of_class[group] = c
        return owner_of_class[labels]

    def assign(self, labels: np.ndarray) -> list[np.ndarray]:
        """Index arrays of the partitions of ``labels``."""
        k = self._num_partitions
        dest = self.owners(labels)
        if self.xi > 0 and k > 1:
            rng = np.random.default_rng(self.seed + 1)
            move = rng.random(len(labels)) < self.xi
            other = rng.integers(0, k - 1, len(labels))
            other = other + (other >= dest)  # uniform over the k-1 other clients
            dest = np.where(move, other, dest)
        return [np.flatnonzero(dest == c) for c in range(k)]

    def load_partition(self, partition_id: int):
        if self._parts is None:
            self._parts = self.assign(np.asarray(self.dataset[self.partition_by]))
        return self.dataset.select(self._parts[partition_id])


@register_partitioner("disentangled")
def _disentangled(num_partitions: int, seed: int, **_):
    return DisentangledPartitioner(num_partitions, seed)


@register_partitioner("near")
def _near(num_partitions: int, seed: int, **kw):
    return DisentangledPartitioner(num_partitions, seed, xi=float(kw.get("xi", 0.1)))


register_partitioner(
    "entangled", partitioner_factory("dirichlet")
)  # entangled = Dirichlet(alpha) over labels


def make_partitions(cfg: dict[str, Any], labels: np.ndarray, k: int) -> list[np.ndarray]:
    """The clients' index arrays into ``labels`` (the run config's ``partitioner``)."""
    return partition_indices(
        labels,
        k,
        cfg["partitioner"],
        seed=cfg["seed"],
        alpha=cfg["alpha"],
        xi=cfg["xi"],
        classes_per_partition=cfg["classes-per-partition"],
    )


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
    """The classifier, initialised from the run seed (identical on every process)."""
    set_seed(derive_seed(cfg["seed"], 0xFFFF))
    return build_model(cfg["model"], (1, 28, 28), 10)


# ---------------------------------------------------------------- FedDistr client step
def cluster_moments(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, log s)`` of one cluster's codes: ``m = mean(mu)``,
    ``s^2 = var(mu) + mean(exp(logvar))`` (the spread of the posterior means plus the encoder's
    own noise: the moments of the mixture of the members' ``q(c | x)``), ``s^2 >= 1e-6``."""
    var = mu.var(0, unbiased=False) + logvar.exp().mean(0)
    return mu.mean(0), 0.5 * var.clamp_min(1e-6).log()


def inversion_steps(cfg) -> int:
    """Inversion steps of this run: ``inversion-steps``, or 0 for a method whose ``invert``
    flag is False (the ``feddistr-noinv`` ablation: the code moments are uploaded as they are)."""
    return cfg["inversion-steps"] if cfg.method.flag("invert", True) else 0


def client_upload(cfg: dict[str, Any], pid: int, k: int) -> tuple[dict[str, np.ndarray], dict]:
    """Split local data into base distributions and fit one Gaussian condition per cluster.

    Per local class: k-means (``clusters-per-class``) on the semantic codes ``mu(x)`` of the
    frozen generator; per cluster, the moments of the codes (plus the encoder noise) give
    ``(m, log s)`` (:func:`cluster_moments`); ``m`` is then refined by
    :func:`feddistr.generator.invert` (textual-inversion style, ``s`` kept) for
    ``inversion-steps`` steps (the default path; method ``feddistr-noinv``: no inversion).
    Returns the arrays to upload and metrics.
    """
    from sklearn.cluster import KMeans

    from feddistr.generator import denoising_loss, invert, load_or_build

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
            m_j, logstd_j = cluster_moments(mu[members], logvar[members])
            labels.append(c)
            counts.append(len(members))
            means.append(m_j)
            logstds.append(logstd_j)
    z0 = gen.latents(x)
    g = torch.Generator().manual_seed(seed)
    steps = inversion_steps(cfg)
    mean0, logstd0 = torch.stack(means), torch.stack(logstds)
    mean, logstd, loss = invert(
        gen, z0, cluster, mean0, logstd0, steps, lr=cfg["inversion-lr"], generator=g
    )
    arrays = {
        "mean": mean.numpy().astype(np.float32),
        "logstd": logstd.numpy().astype(np.float32),
        "label": np.asarray(labels, np.int64),
        "count": np.asarray(counts, np.int64),
    }
    metrics = {"num-examples": len(x), "num-distributions": len(labels), "inv-loss": loss}
    if steps > 0:  # the objective at the code moments and at the uploaded means, same draw
        metrics["inv-loss-init"] = denoising_loss(gen, z0, cluster, mean0, logstd0, seed=seed)
        metrics["inv-loss-final"] = denoising_loss(gen, z0, cluster, mean, logstd, seed=seed)
    return arrays, metrics


def client_upload_step(msg: Message, context: Context, cfg: dict[str, Any]) -> Message:
    """The ClientApp's FedDistr step: this node's base distributions, in one reply."""
    pid, n = partition_of(context)
    arrays, metrics = client_upload(cfg, pid, n)
    record = to_record({k: torch.from_numpy(v) for k, v in arrays.items()})
    return Message(content=reply(record, **metrics, **{"partition-id": pid}), reply_to=msg)


def client_train(msg: Message, context: Context, cfg: dict[str, Any]) -> Message:
    """The ClientApp's FedAvg / FedProx step: the shared SGD step on this node's partition."""
    pid, n = partition_of(context)
    x, y = client_data(cfg, pid, n)
    return sgd_step(
        msg,
        context,
        make_model(cfg),
        x,
        y,
        cfg["seed"],
        cfg["device"],
        epochs=cfg["local-epochs"],
        batch_size=cfg["batch-size"],
        lr=cfg["lr"],
    )


# ---------------------------------------------------------------- server side
def fit_classifier(
    cfg: dict[str, Any], x: torch.Tensor, y: torch.Tensor, arrays: ArrayRecord | None = None
) -> ArrayRecord:
    """The classifier trained on the server (the synthetic set, or the pooled data of
    ``centralized``): ``server-epochs`` epochs, batch 64, SGD with momentum 0.9, seeded."""
    model = make_model(cfg)
    if arrays is not None:
        load_record(model, arrays)
    g = set_seed(derive_seed(cfg["seed"], 0xC1A5))
    device = get_device(cfg["device"])
    train(model, x, y, epochs=cfg["server-epochs"], batch_size=64, lr=cfg["lr"], momentum=0.9,
          generator=g, device=device)  # fmt: skip
    return to_record(model)


def central_evaluator(cfg: dict[str, Any]):
    """``evaluate_fn(round, arrays)`` on the first ``test-size`` test images."""
    xt, yt = test_data(cfg)
    model = make_model(cfg)
    device = get_device(cfg["device"])

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord(evaluate(load_record(model, arrays), xt, yt, device=device))

    return evaluate_fn


# ---------------------------------------------------------------- server side of the methods
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Boot")  # fmt: skip
MILESTONES = (1, 10, 50)


def server_pieces(cfg, writer) -> dict:
    """The app-specific callables of the strategies: the shared generator (loaded, or
    pre-trained with progress lines, before the clients are called), its sampler, the
    classifier step on the synthetic set, and centralized training on the pooled data."""
    from feddistr.generator import load_or_build, sample

    gcfg = gen_config(cfg)
    state = {}

    def prepare() -> None:
        print(f"[feddistr] loading the shared generator ({gcfg.tag()})", flush=True)
        state["gen"] = load_or_build(gcfg, cfg["data-dir"], log_every=50)
        state["rng"] = torch.Generator().manual_seed(derive_seed(cfg["seed"], 0xD1))

    def sample_fn(mean, logstd, n: int) -> torch.Tensor:
        return sample(
            state["gen"],
            torch.from_numpy(np.asarray(mean, np.float32)),
            torch.from_numpy(np.asarray(logstd, np.float32)),
            n,
            ddim_steps=cfg["ddim-steps"],
            guidance=cfg["guidance"],
            generator=state["rng"],
        )

    def train_classifier(xs, ys):
        x, y = torch.cat(xs), torch.tensor(ys, dtype=torch.long)
        if cfg["save-samples"]:
            classes = sorted(set(ys))
            rows = [x[y == c][:10] for c in classes]
            path = save_grid(
                rows, writer.out_dir / "synthetic_samples.png", [CLASSES[c] for c in classes]
            )
            writer.set("samples_png", str(path))
        return fit_classifier(cfg, x, y)

    def fit_pooled(server_round: int, arrays):
        x, y = private_pool(cfg)
        return fit_classifier(cfg, torch.from_numpy(x), torch.from_numpy(y), arrays), {}

    return {
        "cond_dim": gcfg.cond_dim,
        "prepare": prepare,
        "sample": sample_fn,
        "train_classifier": train_classifier,
        "fit": fit_pooled,
    }


def final_metrics(writer, result, rounds: int) -> dict:
    """Accuracy and loss of the last round, the protocol's bytes, and accuracy / cumulative
    bytes at rounds 1, 10 and 50 (those reached)."""
    server = result.evaluate_metrics_serverapp
    final = {k: float(v) for k, v in server.get(rounds, {}).items()}
    final["rounds"] = rounds
    cum = 0
    for row in writer.record["rounds"]:
        cum += row.get("bytes_sent", 0) + row.get("bytes_received", 0)
        r = row["round"]
        if r in MILESTONES or r == rounds:
            final[f"accuracy_r{r}"] = float(server.get(r, {}).get("accuracy", float("nan")))
            final[f"bytes_total_r{r}"] = cum
    totals = writer.record["extra"].get("totals", {})
    final["bytes_sent"] = totals.get("bytes_sent", 0)
    final["bytes_received"] = totals.get("bytes_received", 0)
    final["bytes_total"] = final["bytes_sent"] + final["bytes_received"]
    return final
