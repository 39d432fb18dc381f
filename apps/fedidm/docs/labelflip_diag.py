"""Why FedIDM misses the 30 % target under label-flip (README "Diagnosis"): per round, from the
``results.json`` of the label-flip runs and of the no-attack run of the same seed found below a
folder (FedIDM, 30 % malicious, Fashion-MNIST, Dirichlet 0.5): server accuracy with and without
the attack, which attackers / benign clients were rejected (and by which rule), which sets label
rectification dropped, how many attackers' synthetic sets were in the condensed pool.

    .venv/bin/python apps/fedidm/docs/labelflip_diag.py outputs/fedidm_grid [ATTACK]

Reads only; runs nothing.
"""

from __future__ import annotations

import sys

import numpy as np

from flowerbed.simulation.table import collect


def _runs(folder: str, attack: str) -> dict[tuple[str, int], dict]:
    out = {}
    for r in collect(folder):
        c = r["config"]
        if c.get("method") != "fedidm" or "final" not in r["extra"]:
            continue
        if c["attack"] == attack and abs(c["attack-fraction"] - 0.3) < 1e-9:
            out[(attack, c["seed"])] = r
        elif c["attack"] == "none" and c.get("num-server-rounds") == 10:
            out[("none", c["seed"])] = r
    return out


def per_round(run: dict, clean: dict | None) -> list[dict]:
    """One row per round: accuracy, rejections split by attacker / benign, pool composition."""
    clean_acc = {r["round"]: r.get("server_accuracy") for r in (clean or {}).get("rounds", [])}
    rows, accepted_prev = [], None
    for r in run["rounds"]:
        if r["round"] == 0 or "rejected_nodes" not in r:
            continue
        bad = set(r.get("malicious_nodes", []))
        nodes = {int(n) for n in r["cos"]}
        rej = set(r["rejected_nodes"])
        dropped = set(r.get("rectify_dropped", []))
        # the pool of round t holds the sets of the clients accepted in round t-1 (all in round 1)
        pool = nodes if accepted_prev is None else accepted_prev
        reasons = [v.split(":")[0] for n, v in r["reject_reasons"].items() if int(n) not in bad]
        rows.append(
            {
                "round": r["round"],
                "acc": r.get("server_accuracy"),
                "acc_clean": clean_acc.get(r["round"]),
                "mal_rejected": len(rej & bad),
                "benign_rejected": len(rej - bad),
                "benign_reasons": ",".join(sorted(set(reasons))) or "-",
                "mal_in_pool": len((pool & bad) - dropped),
                "mal_dropped": len(dropped & bad),
                "benign_dropped": len(dropped - bad),
                "pool": r.get("condensed_size"),
                "agree": r.get("label_agreement"),
                "cos_mal": float(np.mean([v for n, v in r["cos"].items() if int(n) in bad])),
                "cos_ben": float(np.mean([v for n, v in r["cos"].items() if int(n) not in bad])),
            }
        )
        accepted_prev = nodes - rej
    return rows


def main(folder: str, attack: str = "label-flip") -> None:
    runs = _runs(folder, attack)
    for seed in sorted({s for a, s in runs if a == attack}):
        run, clean = runs[(attack, seed)], runs.get(("none", seed))
        rows = per_round(run, clean)
        f = run["extra"]["final"]
        print(
            f"\n{attack}, seed {seed} (commit {run['git_commit'][:7]}): final {f['accuracy']:.4f}"
            + (f", no attack {clean['extra']['final']['accuracy']:.4f}" if clean else "")
            + f", precision {f['detect_precision']:.3f}, recall {f['detect_recall']:.3f}"
        )
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in rows:
            cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()]
            print("| " + " | ".join(cells) + " |")
        acc = [r["acc"] - r["acc_clean"] for r in rows if r["acc_clean"] is not None]
        print(
            f"accepted attacker updates {sum(6 - r['mal_rejected'] for r in rows)} of "
            f"{6 * len(rows)}; benign rejections {sum(r['benign_rejected'] for r in rows)}; "
            f"attacker sets in the pool (sum over rounds) {sum(r['mal_in_pool'] for r in rows)}; "
            f"accuracy gap to no attack: mean over rounds {np.mean(acc):+.4f}, "
            f"last 3 rounds {np.mean(acc[-3:]):+.4f}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:3])
