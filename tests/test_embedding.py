"""flowerbed.common.embedding: the spreadout regulariser's value and gradient by hand, the Gram
form against the V x V form, the FLOP count."""

import math

import pytest
import torch

from flowerbed.common.embedding import spreadout_flops, spreadout_sq


def test_spreadout_value_by_hand():
    # rows (1,0), (1,1), (0,2): cosines 1/sqrt2 (1-2), 0 (1-3), 1/sqrt2 (2-3); squared and
    # summed over ordered pairs i != j: 2 * (1/2 + 0 + 1/2) = 2
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    assert spreadout_sq(t).item() == pytest.approx(2.0, abs=1e-6)
    # scaling a row changes nothing (cosines); without normalising it does
    assert spreadout_sq(t * torch.tensor([[3.0], [1.0], [0.5]])).item() == pytest.approx(2.0)
    assert spreadout_sq(t, normalize=False).item() == pytest.approx(2 * (1 + 0 + 4))


def test_spreadout_gradient_by_hand():
    # on unit rows n_k: d/dn_k sum_{i!=j} (n_i.n_j)^2 = 4 sum_{j!=k} (n_k.n_j) n_j
    r = 1 / math.sqrt(2)
    n = torch.tensor([[1.0, 0.0], [r, r], [0.0, 1.0]], requires_grad=True)
    spreadout_sq(n, normalize=False).backward()
    want = torch.tensor([[2.0, 2.0], [4 * r, 4 * r], [2.0, 2.0]])
    assert torch.allclose(n.grad, want, atol=1e-6)


def test_gram_form_equals_the_pairwise_form():
    t = torch.randn(50, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = torch.nn.functional.normalize(t, dim=-1)
    c = n @ n.T
    pairwise = (c - torch.diag(torch.diag(c))).pow(2).sum()
    assert spreadout_sq(t).item() == pytest.approx(pairwise.item(), rel=1e-10)


def test_flops_count():
    v, d = 1000, 16
    fwd = 4 * v * d + 2 * v * d * d + 2 * d * d + 3 * v * d
    assert spreadout_flops(v, d, backward=False) == fwd
    assert spreadout_flops(v, d) == 3 * fwd
    assert spreadout_flops(2 * v, d) > 1.9 * spreadout_flops(v, d)  # linear in the rows
