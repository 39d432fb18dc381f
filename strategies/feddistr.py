"""FedDistr: one-shot FL by uploading base distributions, aligning them and synthesising data.

Xinyuan Zhao, Hanlin Gu, Lixin Fan, Qiang Yang, Yuxing Han, "Disentangling data distribution for
Federated Learning", arXiv:2410.12530 (ICLR 2025 submission).

Only the abstract, the opening of the introduction and the public reviews were available; the
pipeline is the paper's, every formula below is a RECONSTRUCTION (see ``apps/feddistr``):

- **upload** (the only phase, one message per client): each client describes its data as base
  distributions, one Gaussian ``N(m, diag(exp(log s)^2))`` over the condition space of a shared,
  frozen generator per row, with its class ``label`` and sample ``count`` (ArrayRecord
  ``arrays``: ``mean (k, d)``, ``logstd (k, d)``, ``label (k,)``, ``count (k,)``; metric
  ``partition-id``). Uploads are validated (:func:`check_upload`, named reasons);
- **Active Distribution Alignment** (:func:`consolidate`): the uploads are folded, in
  partition order, into one set; each upload is matched against the set on a weighted bipartite
  graph (Hungarian algorithm on the cosine similarity of the means, :func:`match`); a matched
  pair with similarity ``>= threshold`` (and the same label, by default) is *parallel* and merged
  by count-weighted moment matching (:func:`merge`), the rest is *orthogonal* and kept;
- **synthesis and training**: per class, ``synthetic_per_class`` samples are split among that
  class's distributions by count (:func:`allocate`) and drawn with the app's ``sample``
  callable (the shared generator); the app's ``train_classifier`` trains the global model on them.
  The round's arrays are that model; the server-side ``evaluate_fn`` evaluates it as usual.

``align=False`` (ablation "no alignment") keeps every uploaded distribution as it is.
Per round, :attr:`FedDistr.history` holds the counts (uploaded, consolidated, merges, rejected,
synthetic set) and the phase times; :attr:`FedDistr.consolidated` the aligned set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from scipy.optimize import linear_sum_assignment

from flowerbed.common.protocol import (
    PhasedStrategy,
    Protocol,
    ProtocolError,
    RoundOutcome,
    wait_for_nodes,
)

FORBIDDEN = -1e9
UPLOAD_KEYS = ("mean", "logstd", "label", "count")
PARTITION_KEY = "partition-id"


# ---------------------------------------------------------------------------- alignment
@dataclass
class Dist:
    """One base distribution ``N(mean, diag(exp(logstd)^2))`` with its label and count."""

    mean: np.ndarray
    logstd: np.ndarray
    label: int
    count: int
    sources: list[int] = field(default_factory=list)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix between the rows of ``a`` (n, d) and ``b`` (m, d)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    return (a / np.maximum(na, 1e-12)) @ (b / np.maximum(nb, 1e-12)).T


def match(sim: np.ndarray, threshold: float, allowed: np.ndarray | None = None):
    """Maximum-weight bipartite matching; keep pairs with ``sim >= threshold`` that are allowed.

    Parameters
    ----------
    sim : np.ndarray
        Similarity matrix (n, m).
    threshold : float
        Minimum similarity of a kept ("parallel") pair.
    allowed : np.ndarray of bool or None, default None
        Mask of pairs that may be matched (e.g. same label); None allows all.

    Returns
    -------
    list of (int, int)
        Matched ``(row, col)`` pairs, sorted by row.
    """
    sim = np.asarray(sim, np.float64)
    if sim.size == 0:
        return []
    w = sim.copy() if allowed is None else np.where(allowed, sim, FORBIDDEN)
    rows, cols = linear_sum_assignment(w, maximize=True)
    return [
        (int(i), int(j))
        for i, j in zip(rows, cols, strict=True)
        if (allowed is None or allowed[i, j]) and sim[i, j] >= threshold
    ]


def merge(a: Dist, b: Dist) -> Dist:
    """Count-weighted moment matching of two Gaussians (the mixture's mean and variance)."""
    n = a.count + b.count
    wa, wb = a.count / n, b.count / n
    mean = wa * a.mean + wb * b.mean
    second = wa * (np.exp(2 * a.logstd) + a.mean**2) + wb * (np.exp(2 * b.logstd) + b.mean**2)
    var = np.maximum(second - mean**2, 1e-12)
    label = a.label if a.count >= b.count else b.label
    return Dist(mean, 0.5 * np.log(var), label, n, a.sources + b.sources)


def consolidate(
    uploads: list[list[Dist]], threshold: float = 0.5, same_label: bool = True
) -> tuple[list[Dist], int]:
    """Fold the clients' uploads, in order, into one set of distinct base distributions.

    Returns the consolidated list and the number of merges done.
    """
    out: list[Dist] = []
    merges = 0
    for upload in uploads:
        if not upload:
            continue
        if out:
            sim = cosine(np.stack([d.mean for d in upload]), np.stack([d.mean for d in out]))
            allowed = None
            if same_label:
                la = np.array([d.label for d in upload])[:, None]
                allowed = la == np.array([d.label for d in out])[None, :]
            pairs = match(sim, threshold, allowed)
        else:
            pairs = []
        matched = {i for i, _ in pairs}
        for i, j in pairs:
            out[j] = merge(out[j], upload[i])
            merges += 1
        out.extend(d for i, d in enumerate(upload) if i not in matched)
    return out, merges


def allocate(dists: list[Dist], per_class: int) -> list[tuple[Dist, int]]:
    """Synthetic sample counts: per class (ascending), ``per_class`` split among that class's
    distributions in proportion to their counts (each at least 1), in the order of ``dists``."""
    out = []
    for c in sorted({d.label for d in dists}):
        members = [d for d in dists if d.label == c]
        total = sum(d.count for d in members)
        out += [(d, max(1, round(per_class * d.count / total))) for d in members]
    return out


# ---------------------------------------------------------------------------- the upload
def check_upload(arrays: dict[str, np.ndarray], cond_dim: int, num_classes: int = 10) -> str | None:
    """Why an upload must be rejected, or None."""
    for key in UPLOAD_KEYS:
        if key not in arrays:
            return f"upload lacks array {key!r}"
    m, s, lab, cnt = (arrays[k] for k in UPLOAD_KEYS)
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


def upload_arrays(msg: Message) -> dict[str, np.ndarray]:
    """The arrays of an upload reply (empty if it has no ``arrays`` record)."""
    if "arrays" not in msg.content.array_records:
        return {}
    return {k: v.numpy() for k, v in msg.content["arrays"].items()}


def upload_dists(msg: Message) -> tuple[int, list[Dist]]:
    """``(partition id, base distributions)`` of a validated upload reply."""
    a = upload_arrays(msg)
    pid = int(msg.content["metrics"][PARTITION_KEY])
    return pid, [
        Dist(a["mean"][i], a["logstd"][i], int(a["label"][i]), int(a["count"][i]), [pid])
        for i in range(len(a["label"]))
    ]


# ---------------------------------------------------------------------------- the strategy
class FedDistr(PhasedStrategy):
    """The one-shot FedDistr protocol: upload, align, synthesise, train.

    Parameters
    ----------
    cond_dim : int
        Dimension of the generator's condition space (width of ``mean`` / ``logstd``).
    sample : callable
        ``sample(mean, logstd, n) -> images`` (a torch tensor): ``n`` samples of one base
        distribution drawn with the shared generator (the app owns the generator's RNG).
    train_classifier : callable
        ``train_classifier(xs, ys) -> ArrayRecord``: the global model trained on the synthetic
        set (``xs``: the list of ``sample`` outputs, ``ys``: one label per synthetic sample).
    synthetic_per_class : int, default 200
        Synthetic samples per class.
    threshold : float, default 0.5
        Cosine similarity from which a matched pair is merged.
    same_label : bool, default True
        Only distributions with the same label may be merged.
    align : bool, default True
        False: no alignment, every uploaded distribution is kept (ablation).
    num_classes : int, default 10
        Labels must lie in ``[0, num_classes)``.
    min_uploads : int, default 1
        Valid uploads needed; with fewer the round raises :class:`ProtocolError`.
    prepare : callable or None, default None
        Called before the upload phase (e.g. load or pre-train the shared generator, so the
        clients find it cached).
    """

    def __init__(
        self,
        cond_dim: int,
        sample: Callable[[np.ndarray, np.ndarray, int], object],
        train_classifier: Callable[[list, list[int]], ArrayRecord],
        synthetic_per_class: int = 200,
        threshold: float = 0.5,
        same_label: bool = True,
        align: bool = True,
        num_classes: int = 10,
        min_uploads: int = 1,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        if synthetic_per_class < 1:
            raise ValueError(f"synthetic_per_class={synthetic_per_class!r} must be >= 1")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold!r} must be a cosine in [-1, 1]")
        self.cond_dim = cond_dim
        self.sample = sample
        self.train_classifier = train_classifier
        self.synthetic_per_class = synthetic_per_class
        self.threshold = threshold
        self.same_label = same_label
        self.align = align
        self.num_classes = num_classes
        self.min_uploads = min_uploads
        self.prepare = prepare
        self.history: dict[int, dict] = {}
        self.consolidated: list[Dist] = []

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t└──> FedDistr (one-shot upload of base distributions):")
        log(INFO, "\t\t├── cond_dim: %d", self.cond_dim)
        log(INFO, "\t\t├── align: %s (threshold %s, same_label %s)", self.align, self.threshold,
            self.same_label)  # fmt: skip
        log(INFO, "\t\t└── synthetic_per_class: %d", self.synthetic_per_class)

    def check_reply(self, msg: Message) -> str | None:
        """Why an upload reply is rejected (:func:`check_upload`, a partition id), or None."""
        if PARTITION_KEY not in msg.content.metric_records.get("metrics", MetricRecord()):
            return f"no metric {PARTITION_KEY!r}"
        return check_upload(upload_arrays(msg), self.cond_dim, self.num_classes)

    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """Upload phase, alignment, synthesis, classifier training."""
        if self.prepare is not None:
            self.prepare()
        t0 = time.perf_counter()
        nodes = wait_for_nodes(protocol.grid)
        train_config["server-round"] = server_round
        rep = protocol.broadcast(
            "upload",
            RecordDict({"config": train_config}),
            nodes,
            message_type=MessageType.TRAIN,
            validate=self.check_reply,
        )
        if len(rep.replies) < max(self.min_uploads, 1):
            raise ProtocolError(
                f"feddistr: {len(rep.replies)} valid upload(s), {self.min_uploads} needed; "
                f"failures: {rep.failures}"
            )
        uploads = sorted((upload_dists(m) for m in rep.replies), key=lambda u: u[0])
        dists = [d for _, up in uploads for d in up]
        if self.align:
            merged, merges = consolidate([up for _, up in uploads], self.threshold, self.same_label)
        else:
            merged, merges = dists, 0
        self.consolidated = merged
        t_upload = time.perf_counter() - t0
        log(INFO, "[feddistr] round %d: %d uploaded -> %d distributions (%d merges)",
            server_round, len(dists), len(merged), merges)  # fmt: skip
        xs, ys = [], []
        for d, n in allocate(merged, self.synthetic_per_class):
            xs.append(self.sample(d.mean, d.logstd, n))
            ys += [d.label] * n
        t_gen = time.perf_counter() - t0 - t_upload
        log(INFO, "[feddistr] round %d: %d synthetic samples in %.1f s, training the model",
            server_round, len(ys), t_gen)  # fmt: skip
        new = self.train_classifier(xs, ys)
        self.history[server_round] = {
            "num_uploaded": len(dists),
            "num_consolidated": len(merged),
            "num_merges": merges,
            "num_rejected": len(rep.failures),
            "synthetic_size": len(ys),
            "time_upload_s": round(t_upload, 2),
            "time_generate_s": round(t_gen, 2),
        }
        return RoundOutcome(arrays=new)
