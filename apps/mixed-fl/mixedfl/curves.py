"""f_f and f_c per round from ``results.json`` files: a PNG (two panels) and the numbers.

The offloading runs record, after every round, the server's evaluation ``f_f`` (mean hinge over
every training example of the run's users) and ``f_c`` (``lam * spreadout``) as ``server_f_f``
and ``server_f_c``; the strategy also records ``f_c`` just before and after each round
(``f_c_before`` / ``f_c_after``)::

    PYTHONPATH=apps/mixed-fl .venv/bin/python -m mixedfl.curves \\
        outputs/mixed-fl/offload/offload-seed0/results.json \\
        outputs/mixed-fl/offload/offload-baseline-seed0/results.json --out outputs/mixed-fl/curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curves(path: Path, keys: tuple[str, ...] = ("server_f_f", "server_f_c")) -> dict[str, list]:
    """``{"round": [...], key: [...]}`` of one ``results.json`` (rounds missing a key skipped)."""
    rec = json.loads(Path(path).read_text())
    rows = [r for r in rec["rounds"] if all(k in r for k in keys)]
    out: dict[str, list] = {"round": [r["round"] for r in rows]}
    for k in keys:
        out[k] = [float(r[k]) for r in rows]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--keys", default="server_f_f,server_f_c")
    ap.add_argument("--out", type=Path, default=Path("outputs/mixed-fl/curves.png"))
    args = ap.parse_args(argv)
    keys = tuple(args.keys.split(","))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
    for path in args.results:
        c = curves(path, keys)
        label = path.parent.name
        print(label, {k: [round(v, 4) for v in c[k]] for k in keys}, flush=True)
        for ax, k in zip(axes, keys, strict=True):
            ax.plot(c["round"], c[k], marker=".", label=label)
    for ax, k in zip(axes, keys, strict=True):
        ax.set_xlabel("round")
        ax.set_title(k)
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
