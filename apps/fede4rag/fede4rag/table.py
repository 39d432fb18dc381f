"""The README's table in one command: every row, with and without CKKS, over seeds.

A *cell* is a method, ``+he`` for the CKKS aggregation, and optional run-config overrides after
a colon (``fede4rag+he``, ``fede4rag:lambda=0``). Each (cell, seed) is one run of the app's
ServerApp and ClientApp in this process (``launcher=local``:
:func:`flowerbed.simulation.local.run_local`, 5 clients) into ``<out>/<cell>-seed<s>/``; a run
whose ``results.json`` already holds the same config is read, not run again, so the command can
be split (``--seeds 1``, ``--cells ...``) and re-run to print the whole table. CKKS runs set
``he-audit-dir``: the evaluator client reports ``max |CKKS mean - plain mean|`` of the aggregate
of every round (:func:`fede4rag.task.he_audit_error`). Printed and written to ``<out>/table.md``:
mean ± sample std over the seeds of the held-out retrieval metrics after the last round and of
the drift from the pretrained encoder, MRR per seed, the server's bytes sent and received per
round (the protocol layer's count), the round time, for CKKS rows the largest aggregate error
and the largest |metric - plaintext row's metric| at the same seed, and the commits::

    python -m fede4rag.table --seeds 0,1,2 --out ../../outputs/fede4rag/table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CELLS = (
    "local",
    "fedavg-infonce",
    "fede4rag",
    "centralized",
    "fedavg-infonce+he",
    "fede4rag+he",
)
#: the README setting: MiniLM's top layer, 843 pairs, 3 rounds of 10 AdamW steps
SETTING = {
    "max-docs": 1000,
    "num-server-rounds": 3,
    "local-steps": 10,
    "optimizer": "adamw",
    "lr": 1e-4,
    "temperature": 0.05,
}
METRICS = ("hit@1", "hit@5", "hit@10", "mrr", "ndcg@10", "drift")
#: config keys that name where a run writes, not what it computes
WHERE = ("results-dir", "he-audit-dir")


def parse_cell(cell: str) -> dict[str, object]:
    """``"fede4rag+he:lambda=0,lr=1e-4"`` -> ``{"method": "fede4rag", "he": True, "lambda":
    "0", "lr": "1e-4"}`` (values as strings: the app's schema casts them)."""
    head, _, rest = cell.partition(":")
    method, plus, he = head.partition("+")
    if plus and he != "he":
        raise ValueError(f"cell {cell!r}: only '+he' may follow the method")
    over: dict[str, object] = {"method": method, "he": bool(plus)}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"cell {cell!r}: {item!r} is not key=value")
        over[key] = value
    return over


def folder_of(out: Path, cell: str, seed: int) -> Path:
    return out / f"{cell.replace(':', '_').replace(',', '_').replace('+', '_')}-seed{seed}"


def overrides_of(cell: str, seed: int, folder: Path, setting: dict) -> dict[str, object]:
    over = {**setting, **parse_cell(cell), "seed": seed, "results-dir": str(folder.resolve())}
    if over["he"]:
        over["he-audit-dir"] = str((folder / "he-audit").resolve())
    return over


def same_config(record: dict, over: dict) -> bool:
    """Whether a ``results.json`` was made with ``over`` (the write locations aside)."""
    from fede4rag.task import parse_config

    want = parse_config({k: v for k, v in over.items() if k not in WHERE})
    have = record.get("config", {})
    return all(have.get(k) == v for k, v in want.items() if k not in WHERE)


def run_cell(cell: str, seed: int, out: Path, setting: dict, num_supernodes: int = 5) -> dict:
    """The ``results.json`` of (cell, seed): read when it holds the same config, else run."""
    from flowerbed.simulation.local import run_local

    folder = folder_of(out, cell, seed)
    over = overrides_of(cell, seed, folder, setting)
    path = folder / "results.json"
    if path.exists():
        record = json.loads(path.read_text())
        if "final" in record.get("extra", {}) and same_config(record, over):
            print(f"[fede4rag.table] {cell} seed {seed}: read {path}", flush=True)
            return record
    t0 = time.perf_counter()
    print(f"[fede4rag.table] {cell} seed {seed}: running -> {folder}", flush=True)
    run_local("fede4rag", over, num_supernodes=num_supernodes)
    record = json.loads(path.read_text())
    print(
        f"[fede4rag.table] {cell} seed {seed}: mrr {record['extra']['final']['mrr']:.4f} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return record


def _rounds(record: dict) -> list[dict]:
    return [r for r in record["rounds"] if r["round"] >= 1]


def summarize(records: list[dict], plain: list[dict] | None = None) -> dict[str, object]:
    """One row: ``records`` are the seeds of a cell; ``plain`` the plaintext cell's records at
    the same seeds (for a CKKS row)."""
    rounds = [r for rec in records for r in _rounds(rec)]
    row: dict[str, object] = {
        m: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
        for m in METRICS
        if (v := [rec["extra"]["final"][m] for rec in records if m in rec["extra"]["final"]])
    }
    row["seeds"] = [int(rec["config"]["seed"]) for rec in records]
    row["mrr-per-seed"] = [float(rec["extra"]["final"]["mrr"]) for rec in records]
    for key, name in (("sent", "bytes_sent"), ("received", "bytes_received")):
        v = [r.get(name, 0) for r in rounds]
        row[key] = (float(np.mean(v)), float(min(v)), float(max(v)))
    times = [r["round_time_s"] for r in rounds]
    row["time"] = (float(np.mean(times)), float(min(times)), float(max(times)))
    row["commits"] = sorted({rec.get("git_commit", "?")[:7] for rec in records})
    errs = [r["server_he-max-abs-err"] for r in rounds if "server_he-max-abs-err" in r]
    row["he-err"] = max(errs) if errs else None
    enc = [r["train_he-encrypt-s"] for r in rounds if "train_he-encrypt-s" in r]
    row["encrypt-s"] = float(np.mean(enc)) if enc else None
    if plain:
        by_seed = {rec["config"]["seed"]: rec["extra"]["final"] for rec in plain}
        diffs = [
            abs(rec["extra"]["final"][m] - by_seed[rec["config"]["seed"]][m])
            for rec in records
            if rec["config"]["seed"] in by_seed
            for m in METRICS[:5]
            if m in rec["extra"]["final"] and m in by_seed[rec["config"]["seed"]]
        ]
        row["vs-plain"] = max(diffs) if diffs else None
    return row


def _mb(v: tuple[float, float, float]) -> str:
    """``mean (min-max)`` in MB, or one number when every round sent the same."""
    mean, lo, hi = (x / 1e6 for x in v)
    return f"{mean:.1f}" if hi - lo < 0.05 else f"{mean:.1f} ({lo:.1f}-{hi:.1f})"


def markdown(rows: dict[str, dict]) -> str:
    """The README table and the per-seed MRR lines."""
    lines = [
        "| row | HE | "
        + " | ".join(METRICS)
        + " | server sent / received per round (MB): mean (min-max) "
        "| round time (s): mean, min-max | max \\|HE - plain\\| aggregate "
        "| max \\|HE - plain\\| metric | seeds | commit |",
        "|---|---|" + "---|" * len(METRICS) + "---|---|---|---|---|---|",
    ]
    for cell, r in rows.items():
        name = cell.replace("+he", "")
        he = "CKKS" if cell.partition(":")[0].endswith("+he") else "no"
        vals = [f"{r[m][0]:.4f} ± {r[m][1]:.4f}" if m in r else "–" for m in METRICS]
        t = r["time"]
        err = f"{r['he-err']:.1e}" if r["he-err"] is not None else "–"
        vsp = f"{r['vs-plain']:.1e}" if r.get("vs-plain") is not None else "–"
        lines.append(
            f"| {name} | {he} | " + " | ".join(vals) + f" | {_mb(r['sent'])} / "
            f"{_mb(r['received'])} | {t[0]:.1f}, {t[1]:.1f}-{t[2]:.1f} | {err} | {vsp} "
            f"| {','.join(map(str, r['seeds']))} | {' '.join(r['commits'])} |"
        )
    lines.append("")
    for cell, r in rows.items():
        per = " / ".join(f"{v:.4f}" for v in r["mrr-per-seed"])
        enc = f"; CKKS encrypt {r['encrypt-s']:.2f} s per client" if r["encrypt-s"] else ""
        lines.append(f"- `{cell}` MRR per seed ({','.join(map(str, r['seeds']))}): {per}{enc}")
    return "\n".join(lines)


def ordering(rows: dict[str, dict]) -> str:
    """Whether the paper's ordering FedE4RAG > FedAvg-InfoNCE > local holds on the mean MRR."""
    try:
        a, b, c = (rows[k]["mrr"][0] for k in ("fede4rag", "fedavg-infonce", "local"))
    except KeyError:
        return "ordering: not all of fede4rag, fedavg-infonce, local were run"
    holds = a > b > c
    return (
        f"ordering FedE4RAG > FedAvg-InfoNCE > local on the mean MRR: "
        f"{'holds' if holds else 'does NOT hold'} ({a:.4f}, {b:.4f}, {c:.4f})"
    )


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cells", default=",".join(CELLS), help="';'-separated when one has ':'")
    ap.add_argument("--out", default="outputs/fede4rag/table")
    ap.add_argument("--rounds", type=int, default=SETTING["num-server-rounds"])
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--set", default="", help="extra run config for every cell: k=v,k2=v2")
    ap.add_argument("--only-table", action="store_true", help="read what exists, run nothing")
    a = ap.parse_args(argv)
    sep = ";" if ";" in a.cells or ":" in a.cells else ","
    cells = [c.strip() for c in a.cells.split(sep) if c.strip()]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    setting = {**SETTING, "num-server-rounds": a.rounds}
    for item in filter(None, a.set.split(",")):
        k, _, v = item.partition("=")
        setting[k] = v
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, list[dict]] = {}
    for seed in seeds:
        for cell in cells:
            if a.only_table:
                path = folder_of(out, cell, seed) / "results.json"
                if not path.exists():
                    continue
                records.setdefault(cell, []).append(json.loads(path.read_text()))
            else:
                records.setdefault(cell, []).append(run_cell(cell, seed, out, setting, a.clients))
    rows = {
        cell: summarize(recs, records.get(cell.replace("+he", "")) if "+he" in cell else None)
        for cell, recs in records.items()
        if recs
    }
    md = markdown(rows) + "\n\n" + ordering(rows)
    (out / "table.md").write_text(md + "\n")
    print(md)
    print(f"[fede4rag.table] -> {out / 'table.md'}")
    return md


if __name__ == "__main__":
    main()
