"""Training and evaluation loops on in-memory tensors (CUDA when present)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from logging import WARNING

import torch
from flwr.common import log
from torch import nn


def get_device(prefer: str = "auto") -> torch.device:
    """``cuda`` if available (or asked for and present), ``cpu`` otherwise.

    ``prefer="cuda"`` on a node without CUDA runs on the CPU and logs a warning (once per
    process): in a deployment one run config reaches every node, and a node without a GPU still
    trains (apps that must have CUDA check it in their own config parsing).
    """
    if prefer == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if prefer == "cuda":
        _warn_no_cuda()
    return torch.device("cpu")


@functools.cache
def _warn_no_cuda() -> None:
    log(WARNING, "device='cuda' asked for, but this node has no CUDA device: running on the CPU")


def iterate_minibatches(n: int, batch_size: int, generator: torch.Generator | None = None):
    """Yield index tensors of a random permutation of ``range(n)`` in batches."""
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.01,
    momentum: float = 0.0,
    max_steps: int | None = None,
    proximal_mu: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    before_step: Callable[[nn.Module], None] | None = None,
) -> dict[str, float]:
    """Local SGD (or another optimiser) on ``(x, y)``.

    Parameters
    ----------
    model : nn.Module
        Trained in place.
    x, y : torch.Tensor
        Inputs and targets (kept on CPU; batches are moved to ``device``).
    epochs : int, default 1
        Passes over the data.
    batch_size : int, default 32
        Mini-batch size.
    lr : float, default 0.01
        SGD learning rate.
    momentum : float, default 0.0
        SGD momentum.
    max_steps : int or None, default None
        Stop after this many optimiser steps (None: no cap).
    proximal_mu : float, default 0.0
        FedProx proximal coefficient: adds ``mu/2 * ||w - w_global||^2`` (the weights at entry).
    loss_fn : callable or None, default None
        ``loss_fn(model(xb), yb)``; cross-entropy if None (e.g. a KL loss for soft targets).
    generator : torch.Generator or None, default None
        Shuffling generator (seed it with :func:`flowerbed.common.seeding.derive_seed`).
    device : torch.device or None, default None
        Device; :func:`get_device` if None.
    optimizer : callable or None, default None
        ``optimizer(model.parameters()) -> torch.optim.Optimizer``; SGD with ``lr`` and
        ``momentum`` if None (``lr`` and ``momentum`` are then not used).
    before_step : callable or None, default None
        ``before_step(model)`` after each backward pass, before the optimiser step: it may read
        or replace the parameters' ``.grad`` (e.g. Mixed FL adds the server's gradient).

    Returns
    -------
    dict
        ``train_loss`` (mean over steps) and ``steps``.
    """
    device = device or get_device()
    model.to(device).train()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    if optimizer is None:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    else:
        opt = optimizer(model.parameters())
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    total, steps = 0.0, 0
    for _ in range(epochs):
        for idx in iterate_minibatches(len(x), batch_size, generator):
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            if global_params is not None:
                prox = sum(
                    (p - g).pow(2).sum()
                    for p, g in zip(model.parameters(), global_params, strict=True)
                )
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            if before_step is not None:
                before_step(model)
            opt.step()
            total += float(loss.detach())
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return {"train_loss": total / steps, "steps": steps}
    return {"train_loss": total / max(steps, 1), "steps": steps}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1024,
    device: torch.device | None = None,
    num_classes: int = 0,
) -> dict[str, float | list[int]]:
    """Cross-entropy loss and accuracy of ``model`` on ``(x, y)``; with ``num_classes > 0``
    also ``class-correct``, the number of correctly classified examples of each class (the
    per-client rows of the participation-gap evaluation)."""
    device = device or get_device()
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    per_class = torch.zeros(max(num_classes, 1), dtype=torch.long)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = model(xb)
        loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        hit = out.argmax(1) == yb
        correct += int(hit.sum())
        if num_classes:
            per_class += torch.bincount(yb[hit].long().cpu(), minlength=num_classes)
    n = max(len(x), 1)
    res: dict[str, float | list[int]] = {"loss": loss_sum / n, "accuracy": correct / n}
    if num_classes:
        res["class-correct"] = per_class.tolist()
    return res
