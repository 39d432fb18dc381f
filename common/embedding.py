"""Embedding-table regularisers shared by the apps that train an item table.

The spreadout regulariser (Zhang, Yu, Kumar and Chang, "Learning Spread-out Local Feature
Descriptors", ICCV 2017; used on item tables by Ning et al., arXiv:2108.07931, and offloaded to
the server by Augenstein et al., arXiv:2205.13655) pushes every pair of rows of a table apart:
with ``N`` the L2-normalised rows,

    spreadout_sq(T) = sum_{i != j} cos(t_i, t_j)^2 = ||N N^T||_F^2 - sum_i ||n_i||^4.

It is computed without the ``V x V`` matrix: ``||N N^T||_F^2 = ||N^T N||_F^2`` (a ``d x d`` Gram
matrix), so the cost is ``O(V d^2)`` instead of ``O(V^2 d)``; :func:`spreadout_flops` counts it.
fed-retrieval's table term is ``lam * sqrt(spreadout_sq)`` (the Frobenius norm of the
off-diagonal part); mixed-fl's offloaded ``f_c`` is ``lam * spreadout_sq``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spreadout_sq(table: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Sum of the squared off-diagonal cosine similarities of the rows of ``table`` ``(V, d)``.

    Parameters
    ----------
    table : torch.Tensor
        The rows (differentiable).
    normalize : bool, default True
        L2-normalise the rows first (False: they already are, e.g. fed-retrieval's
        ``DualEncoder.table()``).

    Returns
    -------
    torch.Tensor
        A scalar ``>= 0`` (up to rounding: ``sum_{i != j} (n_i . n_j)^2``).
    """
    n = F.normalize(table, dim=-1) if normalize else table
    full = (n.T @ n).pow(2).sum()
    diag = n.pow(2).sum(-1).pow(2).sum()
    return full - diag


def spreadout_flops(num_rows: int, dim: int, backward: bool = True) -> int:
    """Floating-point operations of :func:`spreadout_sq` on a ``(num_rows, dim)`` table, counted
    analytically (multiply and add = 2): normalising the rows (``~4 V d``: squares, sums,
    divisions), the Gram matrix ``N^T N`` (``2 V d^2``), its squared Frobenius norm (``2 d^2``),
    the diagonal term (``~3 V d``). With ``backward`` the usual estimate: the backward pass costs
    twice the forward (so 3x in all)."""
    v, d = int(num_rows), int(dim)
    forward = 4 * v * d + 2 * v * d * d + 2 * d * d + 3 * v * d
    return 3 * forward if backward else forward
