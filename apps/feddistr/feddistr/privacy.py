"""What an honest-but-curious server reconstructs from the uploads (OUR measurement, not the
paper's): ``python -m feddistr.privacy [--partitioner P] [--method M] [--seed S]``.

The server sees only each client's upload (per base distribution: ``m``, ``log s``, label,
count) and holds the public generator. It samples ``--per-dist`` images from every uploaded
distribution (DDIM, the run's settings) and we measure, per client:

* **membership gap**: for each reconstruction of class ``c`` from client ``k``, the pixel-space
  L2 distance to its nearest neighbour among client ``k``'s own images of class ``c``
  (``d_own``) and among the same number of HELD-OUT images of class ``c`` (private-pool images
  no client holds, ``d_held``). If the reconstructions reveal the client's own images,
  ``d_own < d_held`` (gap ``d_held - d_own > 0``, "closer to own" fraction > 0.5); 0 and 0.5 mean
  the server learns no more about the client's images than about any images of the class.
* **class leakage**: the accuracy of a 1-nearest-neighbour classifier fitted on held-out real
  images when it labels the reconstructions (against the uploaded labels), next to its accuracy
  on the client's real images: how much class-level content the server gets.

Prints a markdown table and writes ``privacy.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from feddistr import task


def nn_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row of ``a`` (n, ...) the L2 distance to its nearest row of ``b`` (m, ...)."""
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double()).min(1).values


def membership(
    recon: torch.Tensor, own: torch.Tensor, held: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_own, d_held)`` of each reconstruction (``own`` and ``held`` of the same size)."""
    return nn_dist(recon, own), nn_dist(recon, held)


def held_out(cfg, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` private-pool images that no client holds (after the first ``train-size``)."""
    bundle = task.load_fmnist(cfg["data-dir"])
    _, priv = task.split_indices(len(bundle.y_train), task.gen_config(cfg).public_size)
    idx = np.sort(priv[cfg["train-size"] : cfg["train-size"] + n])
    x = torch.from_numpy(np.asarray(bundle.x_train[idx], np.float32))
    return x, torch.from_numpy(np.asarray(bundle.y_train[idx], np.int64))


def attack(cfg, num_clients: int = 5, per_dist: int = 20, n_held: int = 6000) -> dict:
    from feddistr.generator import load_or_build, sample

    gen = load_or_build(task.gen_config(cfg), cfg["data-dir"])
    xh, yh = held_out(cfg, n_held)
    rng = torch.Generator().manual_seed(cfg["seed"])
    rows = []
    for pid in range(num_clients):
        arrays, _ = task.client_upload(cfg, pid, num_clients)
        x, y = task.client_data(cfg, pid, num_clients)
        recs, labs = [], []
        for m, s, c in zip(arrays["mean"], arrays["logstd"], arrays["label"], strict=True):
            recs.append(
                sample(gen, torch.from_numpy(m), torch.from_numpy(s), per_dist,
                       ddim_steps=cfg["ddim-steps"], guidance=cfg["guidance"], generator=rng)
            )  # fmt: skip
            labs += [int(c)] * per_dist
        recon, lab = torch.cat(recs), torch.tensor(labs)
        d_own, d_held = [], []
        for c in lab.unique().tolist():
            own = x[y == c]
            pool = torch.nonzero(yh == c).flatten()
            pick = pool[torch.randperm(len(pool), generator=rng)[: len(own)]]
            a, b = membership(recon[lab == c], own, xh[pick])
            d_own.append(a)
            d_held.append(b)
        d_own, d_held = torch.cat(d_own), torch.cat(d_held)
        nn_lab = yh[torch.cdist(recon.flatten(1), xh.flatten(1)).argmin(1)]
        real_lab = yh[torch.cdist(x.flatten(1), xh.flatten(1)).argmin(1)]
        rows.append(
            {
                "client": pid,
                "n_images": len(x),
                "n_recon": len(recon),
                "d_own": float(d_own.mean()),
                "d_held": float(d_held.mean()),
                "gap": float((d_held - d_own).mean()),
                "closer_to_own": float((d_own < d_held).double().mean()),
                "knn_acc_recon": float((nn_lab == lab).double().mean()),
                "knn_acc_real": float((real_lab == y).double().mean()),
            }
        )
        print(f"[feddistr.privacy] client {pid}: {rows[-1]}", flush=True)
    keys = [k for k in rows[0] if k != "client"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return {"clients": rows, "mean": mean}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partitioner", default="disentangled")
    ap.add_argument("--method", default="feddistr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generator", default="default")
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--per-dist", type=int, default=20)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--out", default="outputs/feddistr-privacy")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = task.parse_config(
        {"partitioner": args.partitioner, "method": args.method, "seed": args.seed,
         "generator": args.generator, "train-size": args.train_size}
    )  # fmt: skip
    res = attack(cfg, args.clients, args.per_dist)
    res["args"] = vars(args)
    out = Path(args.out) / f"{args.method}-{args.partitioner}-seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy.json").write_text(json.dumps(res, indent=1))
    m = res["mean"]
    print("| method | d_own | d_held | gap | closer to own | 1-NN acc recon | 1-NN acc real |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.method} | {m['d_own']:.3f} | {m['d_held']:.3f} | {m['gap']:+.3f} | "
          f"{m['closer_to_own']:.3f} | {m['knn_acc_recon']:.3f} | {m['knn_acc_real']:.3f} |")  # fmt: skip
    print(f"[feddistr.privacy] -> {out / 'privacy.json'}")


if __name__ == "__main__":
    main()
