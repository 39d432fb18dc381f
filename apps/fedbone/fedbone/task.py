"""FedBone app: run-config schema, the three Fashion-MNIST tasks, the split model of each side,
the client's phase functions, the server's general model and the whole-model client step of the
FedAvg / local-only baselines.

Tasks (Reconstruction: the paper's dense-prediction benchmarks are replaced by tasks derived from
Fashion-MNIST; client ``k`` holds task ``TASKS[k % 3]``):

- ``cls``: 10-class classification, cross-entropy, metric accuracy;
- ``denoise``: the image plus Gaussian noise (std ``noise-std``) -> the clean image, MSE on a
  sigmoid output, metric PSNR (dB, from the MSE over the evaluation images);
- ``seg``: foreground segmentation, mask = pixel > ``seg-threshold``, per-pixel BCE, metric IoU.

Split model: client = patch embedding (conv 4x4 stride 4: 1x28x28 -> ``embed-dim``x7x7) +
task-adaptation module (one 3x3 conv block) + task head (pooled linear for ``cls``, transposed
conv 4x4 stride 4 back to 28x28 for the dense tasks); server = the general model G (three 3x3 conv
blocks at 7x7, ``width`` channels). Sizes are for CPU (Reconstruction; the paper's G is a large
vision transformer).

Client state between phases and rounds lives in ``context.state``: the client parts' weights
(``parts``) and their Adam state (``adam``), as ArrayRecords. The client recomputes the patch
embedding in ``train.back`` instead of keeping a graph between calls (deterministic: same batch).
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from torch import nn

from flowerbed.common import config as C
from flowerbed.common.client import partition_tensors
from flowerbed.common.data import load_dataset
from flowerbed.common.records import to_record
from flowerbed.common.seeding import derive_seed
from flowerbed.common.train import get_device

TASKS = ("cls", "denoise", "seg")
METRIC = {"cls": "cls_accuracy", "denoise": "denoise_psnr", "seg": "seg_iou"}

SCHEMA: dict[str, C.Option] = C.compose(
    C.SCHEDULE,
    C.DATA,
    C.DEVICE,
    C.RESULTS,
    {
        "method": C.Option("fedbone"),  # choices from the method table
        "steps": C.Option(20, C.positive, "split steps (or local steps) per round > 0"),
        "batch-size": C.Option(32, C.positive, "images per client and step > 0"),
        "client-lr": C.Option(1e-3, C.positive, "Adam learning rate of the client parts > 0"),
        "server-lr": C.Option(1e-3, C.positive, "Adam learning rate of the general model > 0"),
        "history-beta": C.Option(0.0, lambda v: 0 <= v < 1, "history EMA factor in [0, 1)"),
        "embed-dim": C.Option(16, C.positive, "patch-embedding channels > 0"),
        "width": C.Option(32, C.positive, "channels of the general model > 0"),
        "noise-std": C.Option(0.3, C.non_negative, "denoising input noise std >= 0"),
        "seg-threshold": C.Option(0.1, C.unit_interval, "foreground pixel threshold in [0, 1]"),
        "eval-samples": C.Option(500, C.positive, "held-out test images per client > 0"),
    },
    num_server_rounds=10,
    dataset="fashion_mnist",
    partitioner="iid",
)


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one line naming a bad key or value) and resolve ``method``."""
    from fedbone.methods import METHODS

    return C.parse(run_config, {**SCHEMA, "method": METHODS.option("fedbone")}, methods=METHODS)


def task_of(pid: int) -> str:
    """The task of partition ``pid``."""
    return TASKS[pid % len(TASKS)]


# ---------------------------------------------------------------------------- models
def _conv(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


class General(nn.Module):
    """The server's general model G: ``embed-dim``x7x7 -> ``width``x7x7."""

    def __init__(self, embed_dim: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(embed_dim, width), _conv(width, width), _conv(width, width))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.body(e)


class ClientParts(nn.Module):
    """A client's patch embedding, task-adaptation module and task head."""

    def __init__(self, task: str, embed_dim: int, width: int) -> None:
        super().__init__()
        self.task = task
        self.embed = nn.Conv2d(1, embed_dim, 4, stride=4)
        self.adapt = _conv(width, width)
        if task == "cls":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
        else:
            self.head = nn.ConvTranspose2d(width, 1, 4, stride=4)

    def top(self, feats: torch.Tensor) -> torch.Tensor:
        """Adaptation module and head on the general features."""
        return self.head(self.adapt(feats))


def make_general(cfg) -> General:
    """G, initialised from the run seed (identical in every process)."""
    torch.manual_seed(derive_seed(cfg["seed"], 0x6E))
    return General(cfg["embed-dim"], cfg["width"])


def make_parts(cfg, pid: int) -> ClientParts:
    """Client ``pid``'s parts, initialised from (seed, pid)."""
    torch.manual_seed(derive_seed(cfg["seed"], pid, 0xC1))
    return ClientParts(task_of(pid), cfg["embed-dim"], cfg["width"])


def initial_arrays(cfg) -> ArrayRecord:
    return to_record(make_general(cfg))


# ---------------------------------------------------------------------------- data and losses
def client_pool(cfg, pid: int, n: int) -> torch.Tensor:
    """This partition's training images and labels (the registered partitioner)."""
    x, y, _ = partition_tensors(cfg, pid, n)
    return x, y


@lru_cache(maxsize=4)
def _test(dataset: str, data_dir: str):
    b = load_dataset(dataset, data_dir or None, mmap=True)
    return b.x_test, b.y_test


def task_batch(cfg, task: str, x: torch.Tensor, y: torch.Tensor, seed: int):
    """``(input, target)`` of ``task`` from images ``x`` and labels ``y``; the denoising noise
    is drawn from ``seed``."""
    if task == "cls":
        return x, y
    if task == "denoise":
        g = torch.Generator().manual_seed(seed)
        return x + cfg["noise-std"] * torch.randn(x.shape, generator=g), x
    return x, (x > cfg["seg-threshold"]).float()


def train_batch(cfg, pid: int, n: int, rnd: int, step: int):
    """Client ``pid``'s batch of (round, step), seeded by (seed, pid, round, step)."""
    x, y = client_pool(cfg, pid, n)
    seed = derive_seed(cfg["seed"], pid, rnd, step)
    idx = torch.from_numpy(
        np.random.default_rng(seed).choice(len(x), cfg["batch-size"], replace=False)
    )
    return task_batch(cfg, task_of(pid), x[idx], y[idx], seed)


def eval_batch(cfg, pid: int, n: int):
    """Client ``pid``'s held-out images: ``eval-samples`` test images (``pid::n``)."""
    xt, yt = _test(cfg["dataset"], cfg["data-dir"])
    idx = np.arange(pid, len(xt), n)[: cfg["eval-samples"]]
    x, y = torch.from_numpy(xt[idx].copy()), torch.from_numpy(yt[idx].copy())
    return task_batch(cfg, task_of(pid), x, y, derive_seed(cfg["seed"], pid, 0xE7))


def task_loss(task: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "cls":
        return F.cross_entropy(out, target)
    if task == "denoise":
        return F.mse_loss(torch.sigmoid(out), target)
    return F.binary_cross_entropy_with_logits(out, target)


def task_metrics(task: str, out: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The task's metric(s) on a batch of outputs: accuracy, PSNR (and MSE), IoU."""
    if task == "cls":
        return {"cls_accuracy": float((out.argmax(1) == target).float().mean())}
    if task == "denoise":
        mse = float(F.mse_loss(torch.sigmoid(out), target))
        return {"denoise_psnr": float(10 * np.log10(1.0 / max(mse, 1e-12))), "denoise_mse": mse}
    pred, mask = out > 0, target > 0.5
    union = float((pred | mask).sum())
    return {"seg_iou": float((pred & mask).sum()) / union if union else 1.0}


# ---------------------------------------------------------------------------- client state
def _adam(params: dict[str, nn.Parameter], lr: float, rec: ArrayRecord | None):
    """Adam over named parameters, its moments restored from ``rec`` (keys ``name|field``)."""
    names = list(params)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    if rec is not None and len(rec):
        sd = opt.state_dict()
        for key, arr in rec.items():
            name, fld = key.split("|")
            sd["state"].setdefault(names.index(name), {})[fld] = torch.from_numpy(
                arr.numpy().copy()
            )
        opt.load_state_dict(sd)
    return opt


def _adam_record(opt, names: list[str]) -> ArrayRecord:
    return ArrayRecord(
        {
            f"{names[i]}|{fld}": v.detach().cpu().reshape(v.shape).clone()
            for i, st in opt.state_dict()["state"].items()
            for fld, v in st.items()
        }
    )


class ClientState:
    """A client's parts (and, for the whole-model baselines, its G) with their Adam, loaded from
    and saved to ``context.state``."""

    def __init__(self, cfg, state, pid: int, general: ArrayRecord | None = None) -> None:
        self.cfg, self.state = cfg, state
        self.device = get_device(cfg["device"])
        self.parts = make_parts(cfg, pid)
        if "parts" in state.array_records:
            self.parts.load_state_dict(state["parts"].to_torch_state_dict())
        self.modules: dict[str, nn.Module] = {"parts": self.parts}
        if general is not None:
            g = make_general(cfg)
            g.load_state_dict(general.to_torch_state_dict())
            self.modules["general"] = g
        for m in self.modules.values():
            m.to(self.device)
        self.named = {
            f"{k}.{n}": p for k, m in self.modules.items() for n, p in m.named_parameters()
        }
        self.opt = _adam(self.named, cfg["client-lr"], state.get("adam"))

    def save(self) -> None:
        self.state["parts"] = to_record(self.parts)
        self.state["adam"] = _adam_record(self.opt, list(self.named))


# ---------------------------------------------------------------------------- client phases
def _t(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device)


def head_backward(parts: ClientParts, feats: torch.Tensor, target: torch.Tensor):
    """Adaptation + head + task loss on the general features, backward: ``(dL/dF, loss)``; the
    gradients of the adaptation module and head are left in their ``.grad``."""
    f = feats.detach().requires_grad_(True)
    loss = task_loss(parts.task, parts.top(f), target)
    loss.backward()
    return f.grad.detach(), loss


def client_embed(cfg, state, pid, n, rnd, step) -> tuple[np.ndarray, float]:
    """Phase ``train.embed``: the patch embeddings of the step's batch; (e, compute seconds)."""
    t0 = time.perf_counter()
    cs = ClientState(cfg, state, pid)
    x, _ = train_batch(cfg, pid, n, rnd, step)
    with torch.no_grad():
        e = cs.parts.embed(x.to(cs.device))
    return e.cpu().numpy(), time.perf_counter() - t0


def client_head(cfg, state, pid, n, rnd, step, feats: np.ndarray):
    """Phase ``train.head``: adaptation + head + loss on F, backward, Adam step on them;
    ``(dL/dF, loss, compute seconds)``."""
    t0 = time.perf_counter()
    cs = ClientState(cfg, state, pid)
    _, target = train_batch(cfg, pid, n, rnd, step)
    cs.opt.zero_grad()
    grad, loss = head_backward(cs.parts, _t(feats, cs.device), target.to(cs.device))
    cs.opt.step()
    cs.save()
    return grad.cpu().numpy(), float(loss.item()), time.perf_counter() - t0


def client_back(cfg, state, pid, n, rnd, step, grad_e: np.ndarray) -> float:
    """Phase ``train.back``: the embedding again (same batch), backward with dL/de, Adam step on
    the patch embedding; compute seconds."""
    t0 = time.perf_counter()
    cs = ClientState(cfg, state, pid)
    x, _ = train_batch(cfg, pid, n, rnd, step)
    cs.opt.zero_grad()
    cs.parts.embed(x.to(cs.device)).backward(_t(grad_e, cs.device))
    cs.opt.step()
    cs.save()
    return time.perf_counter() - t0


def client_eval_embed(cfg, state, pid, n) -> np.ndarray:
    cs = ClientState(cfg, state, pid)
    x, _ = eval_batch(cfg, pid, n)
    with torch.no_grad():
        return cs.parts.embed(x.to(cs.device)).cpu().numpy()


def client_eval_head(cfg, state, pid, n, feats: np.ndarray) -> dict[str, float]:
    cs = ClientState(cfg, state, pid)
    _, target = eval_batch(cfg, pid, n)
    with torch.no_grad():
        out = cs.parts.top(_t(feats, cs.device))
    return task_metrics(cs.parts.task, out.cpu(), target)


# ---------------------------------------------------------------------------- the server's G
class TorchGeneral:
    """The server's general model (:class:`flowerbed.strategies.fedbone.GeneralModel`) with its
    Adam optimizer; one kept graph per client of the step."""

    def __init__(self, cfg) -> None:
        self.device = get_device(cfg["device"])
        self.model = make_general(cfg).to(self.device)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.Adam(self.params, lr=cfg["server-lr"])
        self.embed_shape = (cfg["embed-dim"], 7, 7)
        self._graph: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, key: int, e: np.ndarray, train: bool = True) -> np.ndarray:
        x = _t(e, self.device)
        if not train:
            with torch.no_grad():
                return self.model(x).cpu().numpy()
        x.requires_grad_(True)
        out = self.model(x)
        self._graph[key] = (x, out)
        return out.detach().cpu().numpy()

    def backward(self, key: int, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, out = self._graph.pop(key)
        gs = torch.autograd.grad(out, [x, *self.params], _t(grad, self.device))
        flat = torch.cat([g.reshape(-1) for g in gs[1:]])
        return flat.cpu().double().numpy(), gs[0].cpu().numpy()

    def step(self, grad: np.ndarray) -> None:
        flat = torch.from_numpy(np.asarray(grad, dtype=np.float32)).to(self.device)
        start = 0
        for p in self.params:
            p.grad = flat[start : start + p.numel()].view_as(p).clone()
            start += p.numel()
        self.opt.step()
        self._graph.clear()

    def arrays(self) -> ArrayRecord:
        return to_record(self.model)

    def set_arrays(self, record: ArrayRecord) -> None:
        self.model.load_state_dict(record.to_torch_state_dict())


# ---------------------------------------------------------------------------- whole-model client
def whole_train(cfg, state, pid, n, rnd, general: ArrayRecord) -> tuple[ArrayRecord, dict]:
    """FedAvg / local-only client step: ``steps`` Adam steps on the whole model (embedding, G,
    adaptation, head) on the same batches as the split run; returns G's weights and metrics
    (``compute-s`` measured around the steps)."""
    t0 = time.perf_counter()
    cs = ClientState(cfg, state, pid, general)
    g = cs.modules["general"]
    losses = []
    for step in range(cfg["steps"]):
        x, target = train_batch(cfg, pid, n, rnd, step)
        cs.opt.zero_grad()
        out = cs.parts.top(g(cs.parts.embed(x.to(cs.device))))
        loss = task_loss(cs.parts.task, out, target.to(cs.device))
        loss.backward()
        cs.opt.step()
        losses.append(float(loss.item()))
    cs.save()
    metrics = {
        "num-examples": cfg["steps"] * cfg["batch-size"],
        f"loss_{cs.parts.task}": float(np.mean(losses)),
        "compute-s": time.perf_counter() - t0,
    }
    return to_record(g), metrics


def whole_evaluate(cfg, state, pid, n, general: ArrayRecord) -> dict[str, float]:
    """The client's task metric with G = ``general`` and its own parts."""
    cs = ClientState(cfg, state, pid, general)
    x, target = eval_batch(cfg, pid, n)
    with torch.no_grad():
        out = cs.parts.top(cs.modules["general"](cs.parts.embed(x.to(cs.device))))
    return task_metrics(cs.parts.task, out.cpu(), target)


# ---------------------------------------------------------------------------- costs per step
STEP_PHASES = ("train.embed", "train.head", "train.back", "train")


def step_costs(rounds: list[dict], steps: int) -> dict[str, float]:
    """One definition of the cost of a training step for every method, from ``results.json``'s
    rounds: ``bytes_per_step`` (both directions, all clients, the training phases only: the
    split phases or FedAvg's ``train`` exchange; evaluation excluded) and
    ``client_compute_s_per_step`` (seconds measured inside a client's phase functions or local
    steps, mean over clients)."""
    done = [r for r in rounds if r.get("round", 0) > 0]
    if not done:
        return {}
    moved = sum(
        ph["bytes_sent"] + ph["bytes_received"]
        for r in done
        for name, ph in r.get("phases", {}).items()
        if name in STEP_PHASES
    )
    compute = [
        r["client_compute_s_per_step"]
        if "client_compute_s_per_step" in r
        else r.get("train_compute-s", 0.0) / steps
        for r in done
    ]
    return {
        "bytes_per_step": moved / (len(done) * steps),
        "client_compute_s_per_step": float(np.mean(compute)),
    }
