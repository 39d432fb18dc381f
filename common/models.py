"""A small model zoo: MLP and CNN, built by name."""

from __future__ import annotations

import math

import torch
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
