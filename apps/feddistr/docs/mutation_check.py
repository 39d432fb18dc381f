"""Issue #13 mutation check of FedDistr (a dev tool): copies of the worktree at /tmp/fdmut with a
flowerbed shim at /tmp/fdshim (symlinks common, strategies, simulation); each mutation is applied to
the copy, the named test file run, the file restored. Run: python apps/feddistr/docs/mutation_check.py"""

import pathlib
import subprocess
import sys
import time

R = pathlib.Path("/tmp/fdmut")
S = "strategies/feddistr.py"
T = "apps/feddistr/feddistr/task.py"
G = "apps/feddistr/feddistr/generator.py"
ST = "strategies/feddistr_test.py"
AT = "apps/feddistr/tests/test_feddistr_units.py"
M = [
    (
        "S1 merge label: larger count -> smaller",
        S,
        "a.label if a.count >= b.count else b.label",
        "a.label if a.count <= b.count else b.label",
        0,
        ST,
    ),
    (
        "S2 merge label tie: >= -> >",
        S,
        "a.label if a.count >= b.count else b.label",
        "a.label if a.count > b.count else b.label",
        0,
        ST,
    ),
    (
        "S3 merge weights: counts -> 1/2",
        S,
        "wa, wb = a.count / n, b.count / n",
        "wa, wb = 0.5, 0.5",
        0,
        ST,
    ),
    ("S4 merge: drop 0.5 in log s", S, "0.5 * np.log(var)", "np.log(var)", 0, ST),
    (
        "S5 merge: drop mean^2 of a in E[x^2]",
        S,
        "np.exp(2 * a.logstd) + a.mean**2",
        "np.exp(2 * a.logstd)",
        0,
        ST,
    ),
    ("S6 merge var: - mean^2 -> + mean^2", S, "second - mean**2", "second + mean**2", 0, ST),
    ("S7 match threshold >= -> >", S, "sim[i, j] >= threshold", "sim[i, j] > threshold", 0, ST),
    (
        "S8 match maximize -> minimize",
        S,
        "linear_sum_assignment(w, maximize=True)",
        "linear_sum_assignment(w, maximize=False)",
        0,
        ST,
    ),
    ("S9 match ignores the mask", S, "if (allowed is None or allowed[i, j]) and", "if", 0, ST),
    ("S10 cosine: b not normalised", S, "@ (b / np.maximum(nb, 1e-12)).T", "@ b.T", 0, ST),
    (
        "S11 consolidate: same-label mask flipped",
        S,
        "allowed = la == np.array",
        "allowed = la != np.array",
        0,
        ST,
    ),
    ("S12 consolidate: keeps matched too", S, "if i not in matched)", "if True)", 0, ST),
    (
        "S13 allocate: round -> floor",
        S,
        "max(1, round(per_class * d.count / total))",
        "max(1, int(per_class * d.count / total))",
        0,
        ST,
    ),
    (
        "S14 allocate: drop the minimum 1",
        S,
        "max(1, round(per_class * d.count / total))",
        "round(per_class * d.count / total)",
        0,
        ST,
    ),
    (
        "S15 allocate: equal split",
        S,
        "round(per_class * d.count / total)",
        "round(per_class / len(members))",
        0,
        ST,
    ),
    ("S16 check_upload: counts <= 0 -> < 0", S, "cnt.min() <= 0", "cnt.min() < 0", 0, ST),
    ("S17 check_upload: no Inf check on logstd", S, "np.isfinite(s).all()", "True", 0, ST),
    ("S18 align switch forced on", S, "        if self.align:", "        if True:", 0, ST),
    ("S19 align switch forced off", S, "        if self.align:", "        if False:", 0, ST),
    (
        "S20 synthetic label of a sample: first dist's",
        S,
        "ys += [d.label] * n",
        "ys += [merged[0].label] * n",
        0,
        ST,
    ),
    (
        "S21 uploads folded in reverse partition order",
        S,
        "key=lambda u: u[0])",
        "key=lambda u: -u[0])",
        0,
        ST,
    ),
    (
        "A1 moments: drop encoder noise term",
        T,
        "mu.var(0, unbiased=False) + logvar.exp().mean(0)",
        "mu.var(0, unbiased=False)",
        0,
        AT,
    ),
    (
        "A2 moments: drop 0.5 in log s",
        T,
        "0.5 * var.clamp_min(1e-6).log()",
        "var.clamp_min(1e-6).log()",
        0,
        AT,
    ),
    (
        "A3 moments: unbiased variance",
        T,
        "mu.var(0, unbiased=False)",
        "mu.var(0, unbiased=True)",
        0,
        AT,
    ),
    ("A4 moments: mean -> first code", T, "return mu.mean(0), 0.5", "return mu[0], 0.5", 0, AT),
    (
        "A5 invert flag forced off (no inversion)",
        T,
        'return cfg["inversion-steps"] if',
        "return 0 if",
        0,
        AT,
    ),
    (
        "A6 invert flag forced on (noinv inverts)",
        T,
        'if cfg.method.flag("invert", True) else 0',
        "if True else 0",
        0,
        AT,
    ),
    ("A7 label of a cluster: 0", T, "labels.append(c)", "labels.append(0)", 0, AT),
    (
        "A8 inversion loss: target -noise",
        G,
        "F.mse_loss(gen.eps(sched.add_noise(zb, noise, t), t, c), noise)\n        opt",
        "F.mse_loss(gen.eps(sched.add_noise(zb, noise, t), t, c), -noise)\n        opt",
        0,
        AT,
    ),
    (
        "A9 inversion loss: clean latent z0 instead of z_t",
        G,
        "loss = F.mse_loss(gen.eps(sched.add_noise(zb, noise, t), t, c), noise)",
        "loss = F.mse_loss(gen.eps(zb, t, c), noise)",
        0,
        AT,
    ),
    (
        "A10 inversion: drop the condition noise s*eps",
        G,
        "        c = mean[owner] + logstd[owner].exp() * torch.randn(\n            len(zb), mean.shape[1], generator=generator\n        )",
        "        c = mean[owner]",
        0,
        AT,
    ),
    (
        "A11 inversion: fit_std ignored (s never fitted)",
        G,
        "opt = torch.optim.Adam([mean, logstd] if fit_std else [mean], lr=lr)",
        "opt = torch.optim.Adam([mean], lr=lr)",
        0,
        AT,
    ),
    (
        "A12 inversion: fit_std forced on",
        G,
        "logstd = init_logstd.clone().requires_grad_(fit_std)",
        "logstd = init_logstd.clone().requires_grad_(True); fit_std = True",
        0,
        AT,
    ),
    (
        "A13 inversion: gradient ascent",
        G,
        "opt = torch.optim.Adam([mean, logstd] if fit_std else [mean], lr=lr)",
        "opt = torch.optim.Adam([mean, logstd] if fit_std else [mean], lr=lr, maximize=True)",
        0,
        AT,
    ),
    (
        "A14 inversion returns the initial means",
        G,
        "return mean.detach(), logstd.detach(), loss_ema",
        "return init_mean, logstd.detach(), loss_ema",
        0,
        AT,
    ),
    (
        "A15 DDIM: condition noise dropped",
        G,
        "c = mean[None] + logstd.exp()[None] * torch.randn(m, len(mean), generator=generator)",
        "c = mean[None].expand(m, -1) + 0 * torch.randn(m, len(mean), generator=generator)",
        0,
        AT,
    ),
    (
        "A16 DDIM: no guidance",
        G,
        "eps = eps_u + guidance * (eps - eps_u)",
        "eps = eps_u + (eps - eps_u)",
        0,
        AT,
    ),
    ("A17 DDIM: unconditional", G, "eps = gen.eps(z, tt, c)", "eps = gen.eps(z, tt, None)", 0, AT),
    (
        "A18 denoising_loss: clean latent",
        G,
        "return float(F.mse_loss(gen.eps(sched.add_noise(zb, noise, t), t, c), noise))",
        "return float(F.mse_loss(gen.eps(zb, t, c), noise))",
        0,
        AT,
    ),
]
only = sys.argv[1:]
for name, f, old, new, _, test in M:
    if only and name.split()[0] not in only:
        continue
    p = R / f
    orig = p.read_text()
    if orig.count(old) < 1:
        print(f"{name}: PATTERN NOT FOUND", flush=True)
        continue
    p.write_text(orig.replace(old, new, 1))
    t0 = time.time()
    r = subprocess.run(
        [
            "/work/wt-feddistr13/.venv/bin/pytest",
            test,
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow and not e2e",
        ],
        cwd=R,
        env={"PYTHONPATH": "/tmp/fdshim", "PATH": "/usr/bin:/bin", "HOME": "/root"},
        capture_output=True,
        text=True,
    )
    p.write_text(orig)
    failed = [
        ln.split("::")[-1].split(" ")[0] for ln in r.stdout.splitlines() if ln.startswith("FAILED")
    ]
    status = "CAUGHT" if r.returncode == 1 and failed else f"NOT CAUGHT rc={r.returncode}"
    print(f"{name} | {status} | {', '.join(failed)} | {time.time() - t0:.0f}s", flush=True)
    if r.returncode not in (0, 1):
        print(r.stdout[-1500:], r.stderr[-1500:])
