"""Pre-train and cache the shared generator: ``python -m feddistr.pretrain [--tiny]``.

Trains on the PUBLIC split of Fashion-MNIST (images only, no labels; disjoint from every
client's data, see :func:`feddistr.task.split_indices`) and writes the checkpoint to
``<FLOWERBED_CACHE>/feddistr/generator-<tag>.pt``. It also writes a PNG grid of unconditional
samples next to it.
"""

from __future__ import annotations

import argparse
import time

import torch

from feddistr.generator import TINY, GenConfig, checkpoint_path, load_or_build, sample


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny test configuration")
    ap.add_argument("--data-dir", default="", help="Fashion-MNIST folder ('' = default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # much faster than 2 threads on a shared 2-core machine
    cfg = TINY if args.tiny else GenConfig()
    path = checkpoint_path(cfg)
    t0 = time.perf_counter()
    gen = load_or_build(cfg, args.data_dir, log_every=50)
    print(f"[feddistr.pretrain] generator at {path} ({time.perf_counter() - t0:.0f} s)")
    from feddistr.task import save_grid

    g = torch.Generator().manual_seed(0)
    imgs = [
        sample(gen, torch.zeros(cfg.cond_dim), torch.zeros(cfg.cond_dim), 10, generator=g)
        for _ in range(4)
    ]
    print(f"[feddistr.pretrain] samples -> {save_grid(imgs, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
