"""Server-side alignment of uploaded base distributions (RECONSTRUCTION of the paper's
"Active Distribution Alignment").

Each upload is a set of base distributions, one row per distribution: a Gaussian over the
generator's condition space (``mean``, ``logstd``), its class ``label`` and sample ``count``.
The server matches a client's set against the consolidated set on a weighted bipartite graph
(Hungarian algorithm, :func:`scipy.optimize.linear_sum_assignment`, on cosine similarity of the
means). A matched pair with similarity at least ``threshold`` (and, by default, the same label)
is *parallel*: the two are merged by count-weighted moment matching. Everything else is
*orthogonal* and kept as a distinct base distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

FORBIDDEN = -1e9


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
