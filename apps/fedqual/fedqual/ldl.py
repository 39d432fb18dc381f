"""Label distribution learning (LDL): the six standard measures, losses, and a corruption model.

Measures (Geng, "Label Distribution Learning", TKDE 2016), each averaged over samples, with
``d`` the true and ``p`` the predicted distribution of one sample:

=============  ==========================================  ==========
Chebyshev      ``max_j |d_j - p_j|``                       lower best
Clark          ``sqrt(sum_j (d_j - p_j)^2 / (d_j + p_j)^2)``  lower best
Canberra       ``sum_j |d_j - p_j| / (d_j + p_j)``           lower best
KL             ``sum_j d_j ln(d_j / p_j)``                  lower best
Cosine         ``d . p / (|d| |p|)``                        higher best
Intersection   ``sum_j min(d_j, p_j)``                      higher best
=============  ==========================================  ==========

Terms with ``d_j + p_j = 0`` count 0 in Clark and Canberra, terms with ``d_j = 0`` count 0 in KL,
and ``p`` is clipped at ``EPS`` inside the logarithm (as in PyLDL).

The corruption model (:func:`corrupt`) simulates low-quality annotation of a clean distribution
``d*``: few annotators per sample, label noise, over-sharpening and mixing with random
distributions, each driven by one level ``s`` in [0, 1] (0 = clean). It is a RECONSTRUCTION for
the FedQual benchmarks (the paper's construction was not available).
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-12

METRICS = ("chebyshev", "clark", "canberra", "kl", "cosine", "intersection")
LOWER_IS_BETTER = {"chebyshev": True, "clark": True, "canberra": True, "kl": True}
LOWER_IS_BETTER.update({"cosine": False, "intersection": False})


# ----------------------------------------------------------------------------- measures
def _check(d: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.atleast_2d(np.asarray(d, dtype=np.float64))
    p = np.atleast_2d(np.asarray(p, dtype=np.float64))
    if d.shape != p.shape:
        raise ValueError(f"LDL measures: shapes differ, target {d.shape} vs prediction {p.shape}")
    return d, p


def chebyshev(d, p) -> float:
    d, p = _check(d, p)
    return float(np.abs(d - p).max(1).mean())


def clark(d, p) -> float:
    d, p = _check(d, p)
    s = d + p
    num = (d - p) ** 2
    ratio = np.divide(num, s**2, out=np.zeros_like(num), where=s > 0)
    return float(np.sqrt(ratio.sum(1)).mean())


def canberra(d, p) -> float:
    d, p = _check(d, p)
    s = d + p
    num = np.abs(d - p)
    return float(np.divide(num, s, out=np.zeros_like(num), where=s > 0).sum(1).mean())


def kl(d, p) -> float:
    """``KL(d || p)``: the true distribution first."""
    d, p = _check(d, p)
    terms = np.where(d > 0, d * (np.log(np.maximum(d, EPS)) - np.log(np.maximum(p, EPS))), 0.0)
    return float(terms.sum(1).mean())


def cosine(d, p) -> float:
    d, p = _check(d, p)
    den = np.linalg.norm(d, axis=1) * np.linalg.norm(p, axis=1)
    return float(((d * p).sum(1) / np.maximum(den, EPS)).mean())


def intersection(d, p) -> float:
    d, p = _check(d, p)
    return float(np.minimum(d, p).sum(1).mean())


_FUNCS = {
    "chebyshev": chebyshev,
    "clark": clark,
    "canberra": canberra,
    "kl": kl,
    "cosine": cosine,
    "intersection": intersection,
}


def ldl_metrics(d, p) -> dict[str, float]:
    """The six measures of predictions ``p`` against true distributions ``d`` (``(n, c)``)."""
    return {name: _FUNCS[name](d, p) for name in METRICS}


# ----------------------------------------------------------------------------- losses
def kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``KL(target || softmax(logits))`` (zero-target terms count 0)."""
    logp = torch.log_softmax(logits, dim=1)
    t = target.clamp_min(0)
    ent = torch.where(t > 0, t * torch.log(t.clamp_min(EPS)), torch.zeros_like(t))
    return (ent - t * logp).sum(1).mean()


def calibrated_target(
    d: torch.Tensor | np.ndarray, anchor: torch.Tensor | np.ndarray, alpha: float
) -> torch.Tensor | np.ndarray:
    """FedQual's calibrated target ``(1 - alpha) d + alpha A`` (RECONSTRUCTION)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"calibration weight alpha={alpha!r} must be in [0, 1]")
    return (1.0 - alpha) * d + alpha * anchor


QUALITY_ESTIMATORS = ("corr", "kl")


def row_correlation(d, p) -> np.ndarray:
    """Per-sample Pearson correlation of ``d`` and ``p`` over the labels (0 for constant rows)."""
    d, p = _check(d, p)
    dc = d - d.mean(1, keepdims=True)
    pc = p - p.mean(1, keepdims=True)
    den = np.linalg.norm(dc, axis=1) * np.linalg.norm(pc, axis=1)
    return np.divide((dc * pc).sum(1), den, out=np.zeros(len(d)), where=den > EPS)


def quality_score(d, p_global, kind: str = "corr") -> float:
    """Estimated annotation quality of a client in [0, 1] (RECONSTRUCTION).

    ``d`` are the client's own (possibly corrupted) distributions, ``p_global`` the global
    model's predictions (the semantic anchor) on the same samples; no hidden ground truth is used.

    ``kind="kl"``: ``exp(-mean KL(d || p_global))`` (the paper note's reconstruction). It rewards
    flat annotations: a label mixed with random distributions is close to the smooth global
    prediction in KL, so corrupted clients can score higher than clean ones.
    ``kind="corr"``: ``mean max(0, corr(d, p_global))``, the per-sample Pearson correlation over
    labels; invariant to the annotation's sharpness/flatness, it measures whether the annotation
    ranks the labels as the anchor does.
    """
    if kind == "kl":
        return float(np.exp(-kl(d, p_global)))
    if kind == "corr":
        return float(np.maximum(row_correlation(d, p_global), 0.0).mean())
    raise ValueError(f"unknown quality estimator {kind!r}; known: {', '.join(QUALITY_ESTIMATORS)}")


# ----------------------------------------------------------------------------- corruption
CORRUPTIONS = ("combined", "annotators", "noise", "sharpen", "random-mix")


def num_annotators(level: float, max_annotators: int = 50) -> int:
    """Annotators per sample at ``level``: ``round(max_annotators ** (1 - level))``, at least 1."""
    return max(1, int(round(max_annotators ** (1.0 - level))))


def _votes(d: np.ndarray, m: int, rng: np.random.Generator, smooth: float) -> np.ndarray:
    counts = np.stack([rng.multinomial(m, row / row.sum()) for row in d]).astype(np.float64)
    c = d.shape[1]
    return (counts + smooth / c) / (m + smooth)


def _sharpen(d: np.ndarray, level: float) -> np.ndarray:
    q = np.power(np.maximum(d, 0.0), 1.0 + 9.0 * level)
    return q / np.maximum(q.sum(1, keepdims=True), EPS)


def _noise(d: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    out = d.copy()
    flip = rng.random(len(d)) < 0.5 * level
    for i in np.flatnonzero(flip):
        out[i] = out[i, rng.permutation(d.shape[1])]
    return out


def _random_mix(d: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    r = rng.dirichlet(np.ones(d.shape[1]), size=len(d))
    lam = 0.8 * level
    return (1.0 - lam) * d + lam * r


def corrupt(
    d: np.ndarray,
    level: float,
    kind: str = "combined",
    rng: np.random.Generator | None = None,
    max_annotators: int = 50,
    smooth: float = 0.1,
) -> np.ndarray:
    """Simulated low-quality annotation of clean distributions ``d`` (RECONSTRUCTION).

    Parameters
    ----------
    d : np.ndarray
        Clean distributions, ``(n, c)``, rows summing to one.
    level : float
        Corruption level in [0, 1]; 0 returns ``d`` unchanged.
    kind : str, default "combined"
        ``annotators``: the histogram of ``round(max_annotators ** (1 - level))`` votes drawn
        from ``d`` (plus ``smooth`` pseudo-votes spread evenly); ``noise``: with probability
        ``level / 2`` a sample's distribution is permuted over the labels (label noise);
        ``sharpen``: ``d ** (1 + 9 level)`` renormalised (over-confident annotators);
        ``random-mix``: ``(1 - 0.8 level) d + 0.8 level r`` with ``r ~ Dirichlet(1)``;
        ``combined``: sharpen, then annotators, then noise, then random-mix, all at ``level``.
    rng : np.random.Generator or None, default None
        Random source (seed it per client).
    max_annotators : int, default 50
        Annotators per sample at level 0.
    smooth : float, default 0.1
        Pseudo-votes added to vote histograms.

    Returns
    -------
    np.ndarray
        Corrupted distributions, float32, rows summing to one.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"corruption level {level!r} must be in [0, 1]")
    d = np.asarray(d, dtype=np.float64)
    if level == 0.0:
        return d.astype(np.float32)
    rng = rng or np.random.default_rng(0)
    m = num_annotators(level, max_annotators)
    if kind == "annotators":
        out = _votes(d, m, rng, smooth)
    elif kind == "noise":
        out = _noise(d, level, rng)
    elif kind == "sharpen":
        out = _sharpen(d, level)
    elif kind == "random-mix":
        out = _random_mix(d, level, rng)
    else:
        out = _random_mix(
            _noise(_votes(_sharpen(d, level), m, rng, smooth), level, rng), level, rng
        )
    out = np.maximum(out, 0.0)
    return (out / out.sum(1, keepdims=True)).astype(np.float32)


def client_levels(
    num_clients: int, clean_fraction: float, level: float, spread: float, seed: int
) -> list[float]:
    """Corruption level of each client (RECONSTRUCTION of "controlled quality disparity").

    ``round(clean_fraction * num_clients)`` clients, chosen by ``seed``, stay clean (level 0);
    the others get levels evenly spaced in ``[level * (1 - spread), level]``.
    """
    if not 0.0 <= clean_fraction <= 1.0:
        raise ValueError(f"clean fraction {clean_fraction!r} must be in [0, 1]")
    n_clean = int(round(clean_fraction * num_clients))
    n_bad = num_clients - n_clean
    order = np.random.default_rng(seed).permutation(num_clients)
    bad_levels = np.linspace(level * (1.0 - spread), level, n_bad) if n_bad else []
    levels = [0.0] * num_clients
    for rank, pid in enumerate(order[n_clean:]):
        levels[int(pid)] = float(bad_levels[rank])
    return levels
