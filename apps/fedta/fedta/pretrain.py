"""Pre-train the frozen TinyViT backbone once, outside federated training.

Source: the ``pretrain`` slice of the Fashion-MNIST TRAIN split (the first ``pretrain-size``
images after a fixed shuffle, see :mod:`fedta.data`): no client holds these images, they are not
in the surrogate set, and the test split is never used. Supervised training (Adam, cross-entropy,
``pretrain-epochs`` epochs) of :class:`flowerbed.common.models.TinyViT`; the classification head is
discarded by the app (every method builds its own heads).

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
        f"-split{D.SPLIT_SEED}.pt"
    )
    return cache_dir() / "fedta" / tag


def build(cfg: dict[str, Any], verbose: bool = True) -> tuple[Path, float]:
    """Train the backbone on the pre-training slice; save it; return (path, held-out accuracy).

    The accuracy is measured on the surrogate slice (never trained on here); it is a sanity
    check of the features, not a benchmark.
    """
    t0 = time.perf_counter()
    s = D.slices(cfg["data-dir"], cfg["pretrain-size"], cfg["surrogate-per-class"])
    x, y = D.tensors_at(cfg["data-dir"], s["pretrain"])
    gen = set_seed(PRETRAIN_SEED)
    model = TinyViT(**vit_kwargs(cfg))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    bs = 128
    for _ in range(cfg["pretrain-epochs"]):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(bs):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xs, ys = D.tensors_at(cfg["data-dir"], s["surrogate"])
    model.eval()
    with torch.no_grad():
        acc = float((model(xs).argmax(1) == ys).float().mean())
    path = checkpoint_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"state": model.state_dict(), "kwargs": vit_kwargs(cfg), "heldout_acc": acc}, tmp)
    os.replace(tmp, path)
    if verbose:
        print(
            f"[fedta.pretrain] {len(x)} images, {cfg['pretrain-epochs']} epochs, held-out "
            f"accuracy {acc:.4f} ({time.perf_counter() - t0:.1f} s) -> {path}",
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
    from fedta.task import parse_config
    from flowerbed.simulation.inprocess import app_config

    defaults, _ = app_config(Path(__file__).resolve().parent.parent)
    overrides = {}
    for arg in argv if argv is not None else sys.argv[1:]:
        key, _, value = arg.partition("=")
        overrides[key] = value
    cfg = parse_config({**defaults, **overrides})
    build(cfg)


if __name__ == "__main__":
    main()
