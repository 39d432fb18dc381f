"""Privacy accounting of the gradient DP on dL/dh_B (a Reconstruction: neither the paper nor the
authors' code computes an epsilon).

    python -m flllama.privacy --noise 0.05,0.1,0.3,1.0 --clients 2 --rounds 3 --steps 8 --batch 4

What the authors' code does: ``grad_noise`` is an absolute noise std, set by hand; a formula
from a privacy budget (``noise_std = 2 C q sqrt(2 ln(1.25/delta)) / (budget / max_step)``) is
present but commented out, and no epsilon is reported. What this module computes: the client
sends, for each sample ``i`` of its batch, ``clip(g_i, C) + N(0, (z C)^2 I)`` at the real
positions, ``g_i = dL/dh_B`` of that sample alone (the loss is a sum over the batch's target
tokens divided by a fixed count, so a sample changes only its own row). Neighbouring datasets
differ in one sample replaced by another (its row can move by at most ``2 C``): one release is
the Gaussian mechanism with L2 sensitivity ``2 C`` and std ``z C``, i.e. noise multiplier
``z / 2`` relative to the sensitivity. No amplification by sampling is taken (the hidden state
h_A of the same sample, sent in the clear up to sigma, reveals whether and where it is in the
batch: see the inversion attack), so a sample's cost is ``k`` releases, ``k`` = the number of
steps whose batch holds it. Renyi DP of ``k`` Gaussian releases: ``k alpha / (2 (z/2)^2)``,
converted to (epsilon, delta) by Opacus' ``get_privacy_spent`` (the conversion of Balle et
al. 2020 that Opacus uses), over a grid of orders that reaches close to 1 (small ``z``). The
epsilon covers only the gradient message, never h_A (its noise is not calibrated to any
sensitivity: no DP claim for it).
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

ORDERS = tuple([1 + x / 1000 for x in range(1, 1000)] + [float(a) for a in range(2, 257)])


def releases_rdp(noise: float, releases: int, orders=ORDERS) -> np.ndarray:
    """Renyi DP of ``releases`` per-sample gradient releases at noise multiplier ``noise``
    (std ``noise x clip``, replace-one sensitivity ``2 x clip``), one value per order."""
    from opacus.accountants.analysis.rdp import compute_rdp

    if noise <= 0 or releases < 0:
        raise ValueError(f"noise must be > 0 and releases >= 0, got {noise}, {releases}")
    return np.asarray(compute_rdp(q=1.0, noise_multiplier=noise / 2, steps=releases, orders=orders))


def epsilon(noise: float, releases: int, delta: float = 1e-5) -> tuple[float, float]:
    """(epsilon, best order) of ``releases`` gradient releases at ``delta``."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if releases == 0:
        return 0.0, float("nan")
    eps, order = get_privacy_spent(orders=ORDERS, rdp=releases_rdp(noise, releases), delta=delta)
    return float(eps), float(order)


def max_releases(seed: int, clients: int, rounds: int, steps: int, batch: int) -> int:
    """The most times one training example is in its client's batch over a run (the batches
    of ``flllama.task.client_batch``: seeded by (seed, partition, round, step))."""
    from flllama import data as D
    from flllama.task import client_pool

    seen: Counter = Counter()
    for pid in range(clients):
        pool = client_pool(pid, clients)
        for rnd in range(1, rounds + 1):
            for step in range(steps):
                seen.update(D.batch_indices(pool, batch, seed, pid, rnd, step).tolist())
    return max(seen.values())


def table(noises: list[float], releases: list[int], delta: float) -> str:
    """Markdown: epsilon at ``delta`` per noise multiplier (rows) and number of releases."""
    head = "| grad-dp-noise z | " + " | ".join(f"k = {k}" for k in releases) + " |\n"
    head += "|---" * (len(releases) + 1) + "|\n"
    return head + "\n".join(
        f"| {z:g} | " + " | ".join(f"{epsilon(z, k, delta)[0]:,.1f}" for k in releases) + " |"
        for z in noises
    )


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description="epsilon of the gradient DP on dL/dh_B")
    ap.add_argument("--noise", default="0.05,0.1,0.3,1.0")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    k = max_releases(args.seed, args.clients, args.rounds, args.steps, args.batch)
    print(
        f"[privacy] most releases of one example over the run (seed {args.seed}, "
        f"{args.clients} clients, {args.rounds} x {args.steps} steps, batch {args.batch}): {k}"
    )
    text = table([float(z) for z in args.noise.split(",")], sorted({1, k}), args.delta)
    print(text)
    return text


if __name__ == "__main__":
    main()
