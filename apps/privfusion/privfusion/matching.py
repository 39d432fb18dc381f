"""Graph matching of MLP neurons across two models, and fusion of the aligned models.

GAMF-style formulation (Liu et al., ICML 2022, "Deep Neural Network Fusion via Graph Matching"):
an MLP is a graph whose nodes are the hidden neurons and whose edges are the weights between
consecutive hidden layers. Input and output nodes are fixed to the identity, so the weights from
the inputs (into the first hidden layer) and to the outputs (out of the last hidden layer) become
node (unary) affinities; the weights between hidden layers become edge (pairwise) affinities.
The Lawler QAP ``max_x x^T K x`` over all hidden neurons is solved approximately with pygmtools
(RRWM or spectral matching) and each layer's block of the soft assignment is projected to a
permutation with the Hungarian method (pygmtools). ``hungarian`` is the linear (layer-wise)
variant without pairwise terms.

Layers are given as a list of ``(W, b)`` numpy arrays, ``W`` of shape ``(out, in)``.
"""

from __future__ import annotations

import numpy as np
import pygmtools as pygm

pygm.BACKEND = "numpy"

MATCHERS = ("rrwm", "sm", "hungarian")


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances between rows of ``a`` and rows of ``b``."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def _affinity(d: np.ndarray) -> np.ndarray:
    """exp(-d / mean(d)): scale-free soft affinity in (0, 1]."""
    scale = float(d.mean()) or 1.0
    return np.exp(-d / scale)


def unary_affinities(
    layers_a: list[tuple[np.ndarray, np.ndarray]],
    layers_b: list[tuple[np.ndarray, np.ndarray]],
    acts_a: list[np.ndarray] | None = None,
    acts_b: list[np.ndarray] | None = None,
    act_weight: float = 1.0,
) -> list[np.ndarray]:
    """Node affinities ``U[l][a, b]`` of hidden layer ``l`` (neuron a of A, neuron b of B).

    Features of a hidden neuron: its bias; for the first hidden layer its incoming weight row (the
    input nodes are fixed); for the last hidden layer its outgoing weight column (the output nodes
    are fixed); with ``acts_*`` its (perturbed) activation statistic, weighted by ``act_weight``.
    """
    n_hidden = len(layers_a) - 1
    out = []
    for li in range(n_hidden):
        wa, ba = layers_a[li]
        wb, bb = layers_b[li]
        fa, fb = [ba[:, None]], [bb[:, None]]
        if li == 0:
            fa.append(wa)
            fb.append(wb)
        if li == n_hidden - 1:
            fa.append(layers_a[li + 1][0].T)
            fb.append(layers_b[li + 1][0].T)
        u = _affinity(_dist(np.concatenate(fa, 1), np.concatenate(fb, 1)))
        if acts_a is not None and acts_b is not None and act_weight > 0:
            u = u * _affinity(_dist(acts_a[li], acts_b[li])) ** act_weight
        out.append(u)
    return out


def lawler_affinity(
    layers_a: list[tuple[np.ndarray, np.ndarray]],
    layers_b: list[tuple[np.ndarray, np.ndarray]],
    unary: list[np.ndarray],
) -> np.ndarray:
    """Lawler affinity matrix ``K`` over all hidden neurons (size ``(H*H, H*H)``).

    ``K[idx(a, b), idx(a, b)]`` is the unary affinity; for edges ``a1 -> a2`` of A and
    ``b1 -> b2`` of B between consecutive hidden layers,
    ``K[idx(a1, b1), idx(a2, b2)] = exp(-|W_A[a2, a1] - W_B[b2, b1]| / s)`` (symmetric).
    ``idx(a, b) = b * H + a`` (pygmtools' column-wise vectorisation of the assignment X).
    Pairs across different layers have zero affinity.
    """
    sizes = [u.shape[0] for u in unary]
    offs = np.concatenate([[0], np.cumsum(sizes)])
    h = int(offs[-1])
    k = np.zeros((h * h, h * h), dtype=np.float64)
    for li, u in enumerate(unary):
        a = offs[li] + np.arange(sizes[li])
        idx = a[None, :] * h + a[:, None]  # idx[a, b] = b * h + a
        k[idx.ravel(), idx.ravel()] = u.ravel()
    for li in range(len(sizes) - 1):  # edges hidden li -> hidden li + 1
        wa = layers_a[li + 1][0]  # (n2, n1)
        wb = layers_b[li + 1][0]
        n1, n2 = sizes[li], sizes[li + 1]
        diff = np.abs(wa[:, :, None, None] - wb[None, None, :, :])  # [a2, a1, b2, b1]
        e = _affinity(diff)
        a1 = offs[li] + np.arange(n1)
        a2 = offs[li + 1] + np.arange(n2)
        # i = idx(a1, b1), j = idx(a2, b2), arranged like diff's axes [a2, a1, b2, b1]
        i = (a1[None, :, None, None] + h * a1[None, None, None, :]) + 0 * a2[:, None, None, None]
        j = (a2[:, None, None, None] + h * a2[None, None, :, None]) + 0 * a1[None, :, None, None]
        i, j = np.broadcast_arrays(i, j)
        k[i.ravel(), j.ravel()] = e.ravel()
        k[j.ravel(), i.ravel()] = e.ravel()
    return k


def match(
    layers_a: list[tuple[np.ndarray, np.ndarray]],
    layers_b: list[tuple[np.ndarray, np.ndarray]],
    acts_a: list[np.ndarray] | None = None,
    acts_b: list[np.ndarray] | None = None,
    method: str = "rrwm",
    act_weight: float = 1.0,
    refine_iters: int = 0,
) -> list[np.ndarray]:
    """Per hidden layer, ``perm[l][a]`` = the neuron of B matched to neuron ``a`` of A.

    ``method``: ``rrwm`` / ``sm`` (QAP over all hidden neurons, then Hungarian per layer block) or
    ``hungarian`` (layer-wise linear assignment, input side propagated layer by layer), followed
    by ``refine_iters`` sweeps of :func:`refine`.
    """
    if method not in MATCHERS:
        raise ValueError(f"unknown matcher {method!r}; known: {', '.join(MATCHERS)}")
    if [w.shape for w, _ in layers_a] != [w.shape for w, _ in layers_b]:
        raise ValueError("models to match have different layer shapes")
    n_hidden = len(layers_a) - 1
    if method == "hungarian":
        perms: list[np.ndarray] = []
        cur_b = [(w.copy(), b.copy()) for w, b in layers_b]
        for li in range(n_hidden):
            u = unary_affinities(layers_a, cur_b, acts_a, acts_b, act_weight)[li]
            wa, wb = layers_a[li][0], cur_b[li][0]
            if li > 0:  # incoming weights, inputs already aligned by the previous permutation
                u = u * _affinity(_dist(wa, wb))
            x = pygm.hungarian(u)
            p = x.argmax(1)
            perms.append(p)
            cur_b = permute_layers(cur_b, [p if i == li else None for i in range(n_hidden)])
            if acts_b is not None:
                acts_b = [a[p] if i == li else a for i, a in enumerate(acts_b)]
        # compose: every step permuted cur_b once, so perms are already w.r.t. the original B
        return refine(layers_a, layers_b, perms, acts_a, acts_b, act_weight, iters=refine_iters)
    unary = unary_affinities(layers_a, layers_b, acts_a, acts_b, act_weight)
    k = lawler_affinity(layers_a, layers_b, unary)
    h = sum(u.shape[0] for u in unary)
    solver = pygm.rrwm if method == "rrwm" else pygm.sm
    soft = solver(k, h, h)
    perms, off = [], 0
    for u in unary:
        n = u.shape[0]
        block = soft[off : off + n, off : off + n]
        perms.append(pygm.hungarian(block).argmax(1))
        off += n
    return perms


def _lap(score: np.ndarray) -> np.ndarray:
    """Max-score assignment (pygmtools' Hungarian on a shifted, non-negative score)."""
    return pygm.hungarian(score - score.min()).argmax(1)


def refine(
    layers_a: list[tuple[np.ndarray, np.ndarray]],
    layers_b: list[tuple[np.ndarray, np.ndarray]],
    perms: list[np.ndarray],
    acts_a: list[np.ndarray] | None = None,
    acts_b: list[np.ndarray] | None = None,
    act_weight: float = 0.0,
    iters: int = 10,
) -> list[np.ndarray]:
    """Coordinate ascent on the weight alignment ``sum_l <W_A^l, P_l W_B^l P_{l-1}^T>``.

    Each hidden layer's permutation is re-solved (linear assignment, pygmtools) with the others
    fixed, using its incoming weights and bias AND its outgoing weights (weight matching of
    Ainsworth et al., "Git Re-Basin", ICLR 2023), plus ``act_weight`` times the (rescaled)
    inner product of the released activation profiles. Starts from ``perms``; stops after
    ``iters`` sweeps or when no permutation changes. ``iters = 0`` returns ``perms``.
    """
    perms = [np.asarray(p).copy() for p in perms]
    n_hidden = len(layers_a) - 1
    for _ in range(iters):
        changed = False
        for li in range(n_hidden):
            wa, ba = layers_a[li]
            wb, bb = layers_b[li]
            if li > 0:
                wb = wb[:, perms[li - 1]]
            score = wa @ wb.T + np.outer(ba, bb)
            wa2, wb2 = layers_a[li + 1][0], layers_b[li + 1][0]
            if li + 1 < n_hidden:
                wb2 = wb2[perms[li + 1]]
            score = score + wa2.T @ wb2
            if acts_a is not None and acts_b is not None and act_weight > 0:
                aa = acts_a[li] @ acts_b[li].T
                scale = np.abs(score).mean() / max(np.abs(aa).mean(), 1e-12)
                score = score + act_weight * scale * aa
            p = _lap(score)
            if not np.array_equal(p, perms[li]):
                perms[li], changed = p, True
        if not changed:
            break
    return perms


def permute_layers(
    layers: list[tuple[np.ndarray, np.ndarray]], perms: list[np.ndarray | None]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Reorder hidden neurons: new neuron ``a`` of layer ``l`` = old neuron ``perms[l][a]``."""
    out = [(w.copy(), b.copy()) for w, b in layers]
    for li, p in enumerate(perms):
        if p is None:
            continue
        w, b = out[li]
        out[li] = (w[p], b[p])
        w2, b2 = out[li + 1]
        out[li + 1] = (w2[:, p], b2)
    return out


def average_layers(
    models: list[list[tuple[np.ndarray, np.ndarray]]], weights: list[float] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Weighted average of (already aligned) models, layer by layer."""
    w = np.ones(len(models)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return [
        (
            sum(wi * m[li][0] for wi, m in zip(w, models, strict=True)).astype(np.float32),
            sum(wi * m[li][1] for wi, m in zip(w, models, strict=True)).astype(np.float32),
        )
        for li in range(len(models[0]))
    ]
