"""FedIDM mutation check (a dev tool): a copy of ``strategies/`` in a flowerbed shim at
/tmp/fidmshim (``common`` and ``simulation`` symlinked to this worktree); each mutation is applied
to the copy, ``strategies/fedidm_test.py`` of the copy run, the file restored. A mutation is
"caught" when the test file fails.

    /work/bin/cpu-slot .venv/bin/python apps/fedidm/docs/mutation_check.py
"""

import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[3]
SHIM = pathlib.Path("/tmp/fidmshim")
PKG = SHIM / "flowerbed"
S = PKG / "strategies" / "fedidm.py"
TEST = PKG / "strategies" / "fedidm_test.py"
M = [
    ("cos rule: < tau -> > tau", "if c < tau_cos:", "if c > tau_cos:"),
    ("loss threshold: + MAD -> - MAD", "med + mad_c * float", "med - mad_c * float"),
    ("loss threshold may be below 0", "max(0.0, med + mad_c", "max(-1e9, med + mad_c"),
    (
        "loss rise replaced by the constant L(w)",
        ", x, y) - loss0 for u",
        ", x, y) * 0 + loss0 for u",
    ),
    ("fallback forced to keep", 'if self.fallback == "keep":', "if True:"),
    (
        "trusted pool ignored",
        "trusted = self.trusted if self.trusted_only else None",
        "trusted = None",
    ),
    ("finetune skipped", 'if row["finetuned"]:', "if False:"),
    ("finetune-from ignored", "server_round >= self.finetune_from", "server_round >= 1"),
    (
        "finetune-from off by one",
        "server_round >= self.finetune_from",
        "server_round > self.finetune_from",
    ),
    (
        "client rectification: >= -> <",
        "keep = agree >= self.rectify_min_agree",
        "keep = agree < self.rectify_min_agree",
    ),
    (
        "client rectification: * median -> no median",
        "self.rectify_min_agree * np.median(agree)",
        "self.rectify_min_agree",
    ),
    ("sample rectification disabled", 'if self.rectify == "sample":', "if False:"),
    (
        "clip inverted",
        "np.minimum(1.0, n0 / np.maximum(norms",
        "np.maximum(1.0, n0 / np.maximum(norms",
    ),
    ("mean of accepted -> sum", "w + chosen.mean(0)", "w + chosen.sum(0)"),
]


def main() -> int:
    shutil.rmtree(SHIM, ignore_errors=True)
    PKG.mkdir(parents=True)
    (PKG / "__init__.py").write_text("")
    for name in ("common", "simulation"):
        (PKG / name).symlink_to(REPO / name)
    shutil.copytree(REPO / "strategies", PKG / "strategies")
    clean = S.read_text()
    env = {"PYTHONPATH": str(SHIM), "PATH": "/usr/bin:/bin", "HOME": "/root"}
    cmd = [str(REPO / ".venv/bin/python"), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    base = subprocess.run([*cmd, str(TEST)], env=env, capture_output=True, text=True, cwd=SHIM)
    print("unmutated:", base.stdout.strip().splitlines()[-1], flush=True)
    if base.returncode != 0:
        print("the unmutated tests fail: no mutation check")
        return 1
    caught = 0
    for name, old, new in M:
        assert clean.count(old) == 1, name
        S.write_text(clean.replace(old, new))
        try:
            r = subprocess.run([*cmd, str(TEST)], env=env, capture_output=True, text=True, cwd=SHIM)
        finally:
            S.write_text(clean)
        ok = r.returncode != 0
        caught += ok
        print(
            f"{'caught' if ok else 'MISSED'} | {name} | {r.stdout.strip().splitlines()[-1]}",
            flush=True,
        )
    print(f"{caught}/{len(M)} caught")
    return 0 if caught == len(M) else 1


if __name__ == "__main__":
    sys.exit(main())
