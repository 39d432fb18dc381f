"""Pre-train the frozen TinyViT backbone once, outside federated training.

Source: the ``pretrain`` slice of the Fashion-MNIST TRAIN split (the first ``pretrain-size``
images after a fixed shuffle, see :mod:`fedta.data`): no client holds these images, they are not
in the surrogate set, and the test split is never used. Supervised training (Adam with a cosine
learning-rate decay, cross-entropy, ``pretrain-epochs`` epochs; with ``pretrain-augment``, every
batch is randomly shifted by up to 2 pixels and half of it mirrored left-right) of
:class:`flowerbed.common.models.TinyViT`; the classification head is discarded by the app (every
method builds its own heads). One progress line per epoch.

    python -m fedta.pretrain                          # app defaults (pyproject.toml)
    python -m fedta.pretrain vit-dim=32 pretrain-size=1000 pretrain-epochs=1

The checkpoint goes to ``<cache_dir>/fedta/`` under a name that encodes every setting it depends
on; the app builds it automatically when it is missing.
"""

from __future__ import annotations

import os
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedta import data as D
from flowerbed.common.data import cache_dir
from flowerbed.common.models import TinyViT, freeze
from flowerbed.common.seeding import set_seed

PRETRAIN_SEED = 1234


def vit_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "patch": cfg["vit-patch"],
        "dim": cfg["vit-dim"],
        "depth": cfg["vit-depth"],
        "heads": cfg["vit-heads"],
        "num_classes": 10,
    }


def checkpoint_path(cfg: dict[str, Any]) -> Path:
    tag = (
        f"vit-p{cfg['vit-patch']}-d{cfg['vit-dim']}-l{cfg['vit-depth']}-h{cfg['vit-heads']}"
        f"-n{cfg['pretrain-size']}-e{cfg['pretrain-epochs']}-s{cfg['surrogate-per-class']}"
        f"{'-aug' if cfg['pretrain-augment'] else ''}-split{D.SPLIT_SEED}.pt"
    )
    return cache_dir() / "fedta" / tag


SHIFT = 2  # pixels of the random shift of the augmentation


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random shift of each image by up to :data:`SHIFT` pixels (zero padding) and a
    left-right mirror of each image with probability 1/2."""
    b, _, h, w = x.shape
    xp = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT))
    di = torch.randint(0, 2 * SHIFT + 1, (b,), generator=gen)
    dj = torch.randint(0, 2 * SHIFT + 1, (b,), generator=gen)
    rows = (di[:, None] + torch.arange(h))[:, :, None]
    cols = (dj[:, None] + torch.arange(w))[:, None, :]
    out = xp[torch.arange(b)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


@torch.no_grad()
def accuracy_on(model: TinyViT, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy of the pre-training head on ``(x, y)``."""
    model.eval()
    right = sum(
        int((model(xb).argmax(1) == yb).sum())
        for xb, yb in zip(x.split(batch), y.split(batch), strict=True)
    )
    return right / max(len(y), 1)


def build(cfg: dict[str, Any], verbose: bool = True) -> tuple[Path, float]:
    """Train the backbone on the pre-training slice; save it; return (path, held-out accuracy).

    The held-out accuracy is measured on the surrogate slice (never trained on here); the
    accuracy on the client pool (also disjoint from the pre-training slice, larger) is printed
    and stored in the checkpoint too (``pool_acc``). Both are sanity checks of the features, not
    benchmarks; the test split is never used.
    """
    t0 = time.perf_counter()
    s = D.slices(cfg["data-dir"], cfg["pretrain-size"], cfg["surrogate-per-class"])
    x, y = D.tensors_at(cfg["data-dir"], s["pretrain"])
    gen = set_seed(PRETRAIN_SEED)
    model = TinyViT(**vit_kwargs(cfg))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    epochs = cfg["pretrain-epochs"]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    bs = 128
    xs, ys = D.tensors_at(cfg["data-dir"], s["surrogate"])
    for epoch in range(epochs):
        model.train()
        total, batches = 0.0, 0
        for idx in torch.randperm(len(x), generator=gen).split(bs):
            xb = augment(x[idx], gen) if cfg["pretrain-augment"] else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        sched.step()
        if verbose:
            print(
                f"[fedta.pretrain] epoch {epoch + 1}/{epochs}: loss {total / batches:.4f}, "
                f"held-out accuracy {accuracy_on(model, xs, ys):.4f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    acc = accuracy_on(model, xs, ys)
    xp, yp = D.tensors_at(cfg["data-dir"], s["pool"])
    pool_acc = accuracy_on(model, xp, yp)
    path = checkpoint_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(
        {
            "state": model.state_dict(),
            "kwargs": vit_kwargs(cfg),
            "heldout_acc": acc,
            "pool_acc": pool_acc,
        },
        tmp,
    )
    os.replace(tmp, path)
    if verbose:
        nparams = sum(p.numel() for p in model.parameters())
        print(
            f"[fedta.pretrain] {len(x)} images, {epochs} epochs, {nparams} parameters, "
            f"held-out accuracy {acc:.4f} on the {len(ys)} surrogate images, {pool_acc:.4f} on "
            f"the {len(yp)} client-pool images ({time.perf_counter() - t0:.1f} s) -> {path}",
            flush=True,
        )
    return path, acc


@lru_cache(maxsize=4)
def _load(path: str) -> TinyViT:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = TinyViT(**ckpt["kwargs"])
    model.load_state_dict(ckpt["state"])
    return freeze(model)


def load_backbone(cfg: dict[str, Any]) -> TinyViT:
    """The frozen backbone for ``cfg`` (built first if its checkpoint is missing)."""
    path = checkpoint_path(cfg)
    if not path.exists():
        build(cfg)
    return _load(str(path))


def main(argv: list[str] | None = None) -> None:
    from fedta.task import one_thread, parse_config
    from flowerbed.simulation.inprocess import app_config

    defaults, _ = app_config(Path(__file__).resolve().parent.parent)
    overrides = {}
    for arg in argv if argv is not None else sys.argv[1:]:
        key, _, value = arg.partition("=")
        overrides[key] = value
    cfg = parse_config({**defaults, **overrides})
    one_thread()  # one CPU slot; the same checkpoint as a build inside a client
    build(cfg)


if __name__ == "__main__":
    main()
