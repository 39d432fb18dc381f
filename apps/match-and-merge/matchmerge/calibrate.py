"""Dev-set look at the rescoring weights: ``python -m matchmerge.calibrate [--source pocketsphinx]``.

Trains the seven client LMs of ``--seed`` (as the clients do), then prints, on the **dev** lists
only, the acoustic 1-best and oracle CER and, for a grid of ``alpha`` and ``beta / alpha``, the dev
CER of each single LM and of the uniform interpolation. Used once to pick ``alpha`` and ``beta``
for the pocketsphinx lists (see the README).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from flowerbed.strategies import match_merge as M
from matchmerge import nbest, task


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m matchmerge.calibrate", description=__doc__)
    ap.add_argument("--source", default="pocketsphinx", choices=("pocketsphinx", "simulated"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = task.parse_config({"nbest-source": a.source, "seed": a.seed})
    dev, _ = nbest.nbest_sets(cfg)
    print(
        f"dev: {len(dev)} utterances, acoustic 1-best CER "
        f"{dev.cer_of(np.argmax(dev.am, 1))['all']:.4f}, oracle {dev.oracle()['all']:.4f}"
    )
    lms = [task.client_lm(cfg, p, 1)[0] for p in range(cfg["num-domains"])]
    kinds = [lm.kind for lm in lms]
    tables = M.MatchMerge.tables(lms, dev)
    for alpha in (0.03, 0.1, 0.3, 1.0, 3.0):
        for ratio in (0.0, 1.0, 1.5, 2.0):
            dv = M.DevScorer(dev, tables, kinds, alpha, ratio * alpha)
            singles = [round(dv(M.Candidate((k,))), 4) for k in range(len(lms))]
            print(
                f"alpha {alpha} beta {ratio * alpha:.3g}: singles {singles} "
                f"uniform {dv.cer_uniform()['all']:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
