"""FedBone results table from the sweep folders of `flowerbed-run -m app=fedbone ...`.

Final-round task metrics, the mean conflict rate over all steps and the bytes / client compute
per step (`extra.final`), mean ± sample std over seeds::

    .venv/bin/python apps/fedbone/docs/table.py outputs/fedbone_table_seed0 outputs/fedbone_table_seed12
"""

import glob
import json
import sys
from collections import defaultdict

import numpy as np

rows = defaultdict(lambda: defaultdict(list))
commits = set()
for d in sys.argv[1:]:
    for p in sorted(glob.glob(f"{d}/*/results.json")):
        r = json.load(open(p))
        m = r["config"]["method"]
        commits.add(r["git_commit"][:7])
        for k in ("cls_accuracy", "denoise_psnr", "seg_iou"):
            rows[m][k].append(r["extra"]["final"][k])
        cr = [x.get("conflict_rate") for x in r["rounds"] if x.get("conflict_rate") is not None]
        if cr:
            rows[m]["conflict_rate"].append(float(np.mean(cr)))
        for k in ("bytes_per_step", "client_compute_s_per_step"):
            rows[m][k].append(r["extra"]["final"][k])
cols = ["cls_accuracy", "denoise_psnr", "seg_iou", "conflict_rate", "bytes_per_step"]
print(
    "| method | accuracy (cls) | PSNR (denoise) | IoU (seg) | conflict rate (mean over steps) | bytes per step | seeds |"
)
print("|---|---|---|---|---|---|---|")
order = ["fedbone", "split-pcgrad", "split-avg", "fedavg", "local"]
for m in order:
    g = rows[m]
    n = len(g["cls_accuracy"])

    def f(k, fmt="{:.4f}", g=g, n=n):
        if not g[k]:
            return "–"
        if n == 1:
            return fmt.format(g[k][0])
        return fmt.format(np.mean(g[k])) + " ± " + fmt.format(np.std(g[k], ddof=1))

    print(
        f"| {m} | {f('cls_accuracy')} | {f('denoise_psnr', '{:.2f}')} | {f('seg_iou')} | {f('conflict_rate', '{:.3f}')} | {f('bytes_per_step', '{:,.0f}')} | {n} |"
    )
print("commits:", ",".join(sorted(commits)))
