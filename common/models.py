"""A small model zoo: MLP and CNN, built by name, and a tiny Vision Transformer.

The TinyViT comes with prompt-pool (L2P-style) helpers; FedTA (apps/fedta,
:mod:`flowerbed.strategies.fedta`) uses it as the frozen, pre-trained backbone.

Used by FedTA (apps/fedta, :mod:`flowerbed.strategies.fedta`) as the frozen, pre-trained
backbone. The interface splits the forward pass in two so prompts can be inserted between the
patch embedding and the transformer blocks:

``embed(x) -> E``               patch tokens with positional embedding, ``(B, P, D)``
``features(E, prompts) -> F``   ``[cls; prompts; E]`` through the blocks, the normalised cls
                                output ``(B, D)``; ``prompts`` is ``(B, T, D)`` or None

Prompt pools are plain tensors: ``prompts (M, L, D)`` (M entries of L tokens) and ``keys (M, D)``.
:func:`select_topk` picks the N entries whose keys are most cosine-similar to a query (the
frozen model's cls feature of the un-prompted input), :func:`gather_prompts` concatenates them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Fully connected network on flattened inputs.

    Parameters
    ----------
    in_features : int
        Flattened input size.
    num_classes : int
        Output size.
    hidden : tuple of int, default (200, 200)
        Hidden layer widths (ReLU between layers).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (200, 200)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two conv blocks and two linear layers (the FedAvg paper's CNN, narrower by default).

    Parameters
    ----------
    in_channels : int
        Image channels.
    num_classes : int
        Output size.
    image_size : int, default 28
        Input height = width.
    channels : tuple of int, default (16, 32)
        Channels of the two 5x5 conv layers (each followed by ReLU and 2x2 max-pool).
    hidden : int, default 128
        Width of the hidden linear layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int = 28,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 128,
    ):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS = ("mlp", "cnn")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kw) -> nn.Module:
    """Build model ``name`` (``"mlp"`` or ``"cnn"``) for ``input_shape`` (without batch)."""
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes, **kw)
    if name == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"model 'cnn' needs image inputs (C, H, W), got shape {input_shape}")
        return CNN(input_shape[0], num_classes, image_size=input_shape[1], **kw)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


# ---------------------------------------------------------------------------- TinyViT
class Block(nn.Module):
    """Pre-norm transformer block (multi-head self-attention + MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small ViT for 28x28 grey images.

    Parameters
    ----------
    image_size : int, default 28
        Side of the square input.
    patch : int, default 7
        Patch side (must divide ``image_size``).
    channels : int, default 1
        Input channels.
    dim : int, default 64
        Embedding dimension D.
    depth : int, default 2
        Number of transformer blocks.
    heads : int, default 4
        Attention heads (must divide ``dim``).
    mlp_ratio : float, default 2.0
        MLP hidden size over ``dim``.
    num_classes : int, default 10
        Outputs of ``head`` (used for pre-training only; FedTA uses its own heads).
    """

    def __init__(
        self,
        image_size: int = 28,
        patch: int = 7,
        channels: int = 1,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        num_classes: int = 10,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch={patch} must divide image_size={image_size}")
        if dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}")
        self.dim = dim
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        n = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus positional embedding, ``(B, P, D)`` (the paper's ``f_e(x)``)."""
        e = self.patch_embed(x).flatten(2).transpose(1, 2)
        return e + self.pos[:, 1:]

    def features(self, e: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised cls output of ``[cls; prompts; e]``, shape ``(B, D)``."""
        cls = (self.cls_token + self.pos[:, :1]).expand(e.shape[0], -1, -1)
        parts = [cls] if prompts is None else [cls, prompts]
        h = torch.cat([*parts, e], dim=1)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.embed(x)))


def freeze(model: nn.Module) -> nn.Module:
    """Switch ``model`` to eval mode with no trainable parameters; return it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` along the last dimension (broadcasting)."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


def select_topk(query: torch.Tensor, keys: torch.Tensor, n: int) -> torch.Tensor:
    """Indices ``(B, n)`` of the ``n`` keys most cosine-similar to each query row."""
    sim = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T
    return sim.topk(min(n, keys.shape[0]), dim=1).indices


def gather_prompts(prompts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Selected prompt tokens ``(B, n * L, D)`` from a pool ``(M, L, D)`` and ``idx (B, n)``."""
    b, n = idx.shape
    return prompts[idx].reshape(b, n * prompts.shape[1], prompts.shape[2])


def prompted_features(
    backbone: TinyViT,
    e: torch.Tensor,
    query: torch.Tensor,
    prompts: torch.Tensor,
    keys: torch.Tensor,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the prompt-enhanced input ``E' = [IE_s1..IE_sN; E]`` (Eq. 2) and the indices.

    ``query`` is the frozen model's feature of the plain input (``backbone.features(e)``).
    """
    idx = select_topk(query.detach(), keys.detach(), n)
    return backbone.features(e, gather_prompts(prompts, idx)), idx
