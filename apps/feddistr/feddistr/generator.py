"""The shared generative model: a small latent diffusion model built with ``diffusers``.

It stands in for the paper's Stable Diffusion (RECONSTRUCTION, see the README):

* an autoencoder maps a 28x28 image (zero-padded to 32x32) to a 4x8x8 latent;
* a ``diffusers.UNet2DModel`` denoises those latents (epsilon prediction, DDPM training
  schedule, DDIM sampling); its conditioning input is a ``d``-dimensional vector ``c``
  projected and added to the timestep embedding (``class_embed_type="identity"``);
* the conditioning space is learned WITHOUT labels, as in a diffusion autoencoder: during
  pre-training ``c`` is the bounded code ``tanh(f(x))`` of a semantic encoder of the image
  itself plus fixed Gaussian noise, and is dropped to the null vector with probability
  ``p_uncond``. No class label is ever seen, so a server holding only this model cannot train a
  classifier: class information arrives only with the clients' uploads.

Clients describe a base distribution by a Gaussian ``N(m, diag(s^2))`` over ``c`` that they fit
by textual-inversion-style minimisation of the frozen model's denoising loss (see
:func:`invert`). The server samples ``c`` from it, runs DDIM and decodes (see :func:`sample`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PAD = 2  # 28 -> 32


@dataclass(frozen=True)
class GenConfig:
    """Size and pre-training schedule of the generator (the checkpoint is keyed by it)."""

    cond_dim: int = 16
    channels: tuple[int, int] = (32, 64)
    ae_channels: int = 16
    public_size: int = 10000
    ae_steps: int = 500
    diffusion_steps: int = 1600
    batch_size: int = 64
    lr: float = 2e-3
    code_noise: float = 0.1
    p_uncond: float = 0.1
    train_timesteps: int = 1000
    seed: int = 0

    def tag(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


TINY = GenConfig(
    cond_dim=8,
    channels=(16, 32),
    ae_channels=8,
    public_size=512,
    ae_steps=30,
    diffusion_steps=30,
    batch_size=64,
)


class AutoEncoder(nn.Module):
    """Deterministic conv autoencoder ``(n, 1, 32, 32) <-> (n, 4, 8, 8)``."""

    def __init__(self, ch: int = 32):
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(1, ch, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * ch, 2 * ch, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * ch, 4, 3, padding=1),
        )
        self.dec = nn.Sequential(
            nn.Conv2d(4, 2 * ch, 3, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(2 * ch, 2 * ch, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(ch, 1, 3, padding=1),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(F.pad(x, (PAD,) * 4))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec(z))[:, :, PAD:-PAD, PAD:-PAD]


class SemanticEncoder(nn.Module):
    """Label-free semantic code ``c = tanh(f(x))`` in ``[-1, 1]^d``; during pre-training
    ``q(c | x) = N(c, noise^2 I)`` (fixed noise, a smoothness regulariser of the code space)."""

    def __init__(self, cond_dim: int, ch: int = 32, noise: float = 0.1):
        super().__init__()
        self.noise = noise
        self.net = nn.Sequential(
            nn.Conv2d(1, ch, 4, stride=2, padding=1),  # 14
            nn.SiLU(),
            nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1),  # 7
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * ch * 49, cond_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)`` of ``q(c | x)``."""
        mu = torch.tanh(self.net(x))
        return mu, torch.full_like(mu, 2 * float(np.log(self.noise)))


class Generator(nn.Module):
    """Autoencoder + semantic encoder + conditional latent UNet (``diffusers``)."""

    def __init__(self, cfg: GenConfig):
        super().__init__()
        from diffusers import UNet2DModel

        self.cfg = cfg
        self.ae = AutoEncoder(cfg.ae_channels)
        self.sem = SemanticEncoder(cfg.cond_dim, cfg.ae_channels, cfg.code_noise)
        c0, c1 = cfg.channels
        self.unet = UNet2DModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(c0, c1),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            class_embed_type="identity",
        )
        self.cond_proj = nn.Sequential(
            nn.Linear(cfg.cond_dim, 4 * c0), nn.SiLU(), nn.Linear(4 * c0, 4 * c0)
        )
        self.register_buffer("latent_scale", torch.ones(()))

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """Predicted noise; ``c=None`` (or rows of NaN) is the null condition."""
        emb = torch.zeros(len(z_t), self.cond_proj[-1].out_features, device=z_t.device)
        if c is not None:
            emb = self.cond_proj(c)
        return self.unet(z_t, t, class_labels=emb).sample

    @torch.no_grad()
    def latents(self, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
        return torch.cat(
            [self.ae.encode(x[i : i + batch]) / self.latent_scale for i in range(0, len(x), batch)]
        )

    @torch.no_grad()
    def codes(self, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """Posterior means ``mu(x)`` of the semantic encoder."""
        return torch.cat([self.sem(x[i : i + batch])[0] for i in range(0, len(x), batch)])


def scheduler(cfg: GenConfig, ddim: bool = False):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if ddim else DDPMScheduler
    return cls(num_train_timesteps=cfg.train_timesteps, beta_schedule="squaredcos_cap_v2")


def _batches(n: int, bs: int, g: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            yield perm[i : i + bs]


def pretrain(cfg: GenConfig, x: torch.Tensor, log_every: int = 0) -> Generator:
    """Pre-train the generator on unlabeled images ``x`` (n, 1, 28, 28) in [0, 1]."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    gen = Generator(cfg)
    bs = min(cfg.batch_size, len(x))
    # stage 1: autoencoder (reconstruction)
    opt = torch.optim.Adam(gen.ae.parameters(), lr=cfg.lr)
    batches = _batches(len(x), bs, g)
    for step in range(cfg.ae_steps):
        xb = x[next(batches)]
        loss = F.mse_loss(gen.ae.decode(gen.ae.encode(xb)), xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            print(f"[feddistr.pretrain] ae step {step} mse {loss.item():.4f}", flush=True)
    gen.ae.requires_grad_(False)
    with torch.no_grad():
        gen.latent_scale.fill_(float(gen.ae.encode(x[:1024]).std()))
    z_all = gen.latents(x)
    # stage 2: latent diffusion with the label-free semantic condition
    sched = scheduler(cfg)
    params = [*gen.unet.parameters(), *gen.cond_proj.parameters(), *gen.sem.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(cfg.diffusion_steps, 2), pct_start=0.05
    )
    for step in range(cfg.diffusion_steps):
        idx = next(batches)
        xb, z0 = x[idx], z_all[idx]
        mu, logvar = gen.sem(xb)
        c = mu + torch.randn(mu.shape, generator=g) * (0.5 * logvar).exp()
        drop = torch.rand(len(c), generator=g) < cfg.p_uncond
        emb = gen.cond_proj(c) * (~drop)[:, None]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, cfg.train_timesteps, (len(z0),), generator=g)
        z_t = sched.add_noise(z0, noise, t)
        pred = gen.unet(z_t, t, class_labels=emb).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        if log_every and step % log_every == 0:
            print(
                f"[feddistr.pretrain] diffusion step {step} loss {loss.item():.4f} "
                f"code std {mu.std(0).mean().item():.3f}",
                flush=True,
            )
    gen.eval().requires_grad_(False)
    return gen


def checkpoint_path(cfg: GenConfig) -> Path:
    from flowerbed.common.data import cache_dir

    return cache_dir() / "feddistr" / f"generator-{cfg.tag()}.pt"


def public_images(cfg: GenConfig, data_dir: str = "") -> torch.Tensor:
    """The public pre-training split (see :func:`feddistr.task.split_indices`)."""
    from feddistr.task import load_fmnist, split_indices

    bundle = load_fmnist(data_dir)
    pub, _ = split_indices(len(bundle.y_train), cfg.public_size)
    return torch.from_numpy(np.asarray(bundle.x_train[pub], dtype=np.float32))


def load_or_build(cfg: GenConfig, data_dir: str = "", log_every: int = 0) -> Generator:
    """Load the cached checkpoint for ``cfg``; pre-train and cache it first if missing.

    A file lock makes concurrent callers (Ray actors, the ServerApp) build it only once.
    """
    import fcntl

    path = checkpoint_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.exists():
                gen = pretrain(cfg, public_images(cfg, data_dir), log_every=log_every)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                torch.save({"config": asdict(cfg), "state": gen.state_dict()}, tmp)
                os.replace(tmp, path)
                return gen
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    gen = Generator(cfg)
    gen.load_state_dict(blob["state"])
    return gen.eval().requires_grad_(False)


def invert(
    gen: Generator,
    z0: torch.Tensor,
    cluster: torch.Tensor,
    init_mean: torch.Tensor,
    init_logstd: torch.Tensor,
    steps: int,
    lr: float = 0.05,
    batch_per_cluster: int = 16,
    generator: torch.Generator | None = None,
    fit_std: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Textual-inversion-style fit of ``N(m_j, diag(s_j^2))`` per cluster ``j`` (RECONSTRUCTION).

    Minimises ``E_{z in cluster j, t, eps, c ~ N(m_j, s_j^2)} || eps - eps_theta(z_t, t, c) ||^2``
    over ``m_j`` (and ``log s_j`` if ``fit_std``; otherwise ``s_j`` stays at its initial value:
    the denoising loss alone inflates it) with the generator frozen, all clusters in one batch.
    Returns the means, log-stds and the final loss (running mean).
    """
    k = len(init_mean)
    mean = init_mean.clone().requires_grad_(True)
    logstd = init_logstd.clone().requires_grad_(fit_std)
    if steps <= 0:
        return mean.detach(), logstd.detach(), float("nan")
    opt = torch.optim.Adam([mean, logstd] if fit_std else [mean], lr=lr)
    sched = scheduler(gen.cfg)
    members = [torch.nonzero(cluster == j).flatten() for j in range(k)]
    loss_ema = float("nan")
    for _ in range(steps):
        idx = torch.cat(
            [
                m[torch.randint(0, len(m), (batch_per_cluster,), generator=generator)]
                for m in members
            ]
        )
        owner = torch.repeat_interleave(torch.arange(k), batch_per_cluster)
        zb = z0[idx]
        noise = torch.randn(zb.shape, generator=generator)
        t = torch.randint(0, gen.cfg.train_timesteps, (len(zb),), generator=generator)
        c = mean[owner] + logstd[owner].exp() * torch.randn(
            len(zb), mean.shape[1], generator=generator
        )
        loss = F.mse_loss(gen.eps(sched.add_noise(zb, noise, t), t, c), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            logstd.clamp_(-6, 1)
        loss_ema = loss.item() if loss_ema != loss_ema else 0.9 * loss_ema + 0.1 * loss.item()
    return mean.detach(), logstd.detach(), loss_ema


@torch.no_grad()
def denoising_loss(
    gen: Generator,
    z0: torch.Tensor,
    cluster: torch.Tensor,
    mean: torch.Tensor,
    logstd: torch.Tensor,
    draws: int = 64,
    seed: int = 0,
) -> float:
    """The inversion objective ``E ||eps - eps_theta(z_t, t, c)||^2``, ``c ~ N(m_j, s_j^2)``,
    estimated with a FIXED draw (``seed``: the same ``z``, ``t``, ``eps`` and unit noise of ``c``
    for any parameters), ``draws`` samples per cluster: comparable across parameter values."""
    g = torch.Generator().manual_seed(seed)
    sched = scheduler(gen.cfg)
    k = len(mean)
    members = [torch.nonzero(cluster == j).flatten() for j in range(k)]
    idx = torch.cat([m[torch.randint(0, len(m), (draws,), generator=g)] for m in members])
    owner = torch.repeat_interleave(torch.arange(k), draws)
    zb = z0[idx]
    noise = torch.randn(zb.shape, generator=g)
    t = torch.randint(0, gen.cfg.train_timesteps, (len(zb),), generator=g)
    c = mean[owner] + logstd[owner].exp() * torch.randn(len(zb), mean.shape[1], generator=g)
    return float(F.mse_loss(gen.eps(sched.add_noise(zb, noise, t), t, c), noise))


@torch.no_grad()
def sample(
    gen: Generator,
    mean: torch.Tensor,
    logstd: torch.Tensor,
    n: int,
    ddim_steps: int = 25,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    batch: int = 1000,
) -> torch.Tensor:
    """``n`` images from one base distribution: ``c ~ N(mean, diag(exp(logstd)^2))``, DDIM on
    the latent (classifier-free guidance ``guidance`` against the null condition), decode."""
    out = []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        c = mean[None] + logstd.exp()[None] * torch.randn(m, len(mean), generator=generator)
        sched = scheduler(gen.cfg, ddim=True)
        sched.set_timesteps(ddim_steps)
        z = torch.randn(m, 4, 8, 8, generator=generator)
        for t in sched.timesteps:
            tt = torch.full((m,), int(t))
            eps = gen.eps(z, tt, c)
            if guidance != 1.0:
                eps_u = gen.eps(z, tt, None)
                eps = eps_u + guidance * (eps - eps_u)
            z = sched.step(eps, t, z).prev_sample
        out.append(gen.ae.decode(z * gen.latent_scale).clamp(0, 1))
    return torch.cat(out)
