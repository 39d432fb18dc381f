"""FedTA app: run-config schema and the client-side methods (FedTA, its ablations, baselines).

The methods (run-config ``method``) are the rows of :data:`fedta.methods.METHODS`; the code here
reads their flags (``cfg.method.flag(...)``):

``prototypes``  FedTA's client: prompt pool (Eqs. 1-3), tail anchors (``ta``, Eqs. 4-6) and
                prototypes (Eq. 7); the server runs SIKF (``sikf``) and BGPS (``bgps``)
``prompts``     an L2P prompt pool (+ keys) is part of the shared parameters
``head``        a linear head is part of the shared parameters (l2p, fedvit, fedavg)
``finetune``    the whole ViT is shared and fine-tuned (fedavg)

All methods share the frozen pre-trained backbone checkpoint (``fedavg`` starts from it and
unfreezes it). Predictions are restricted to the classes seen by the federation so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord

from fedta.data import PARTITIONER
from flowerbed.common import config as C
from flowerbed.common.models import TinyViT, cosine_distance, prompted_features
from flowerbed.common.seeding import derive_seed, set_seed

SCHEMA: dict[str, C.Option] = C.compose(
    C.SCHEDULE,
    {k: C.DATA[k] for k in ("data-dir", "partitioner", "alpha")},
    {k: C.TRAIN[k] for k in ("local-epochs", "batch-size", "lr")},
    C.DEVICE,
    C.RESULTS,
    {
        # --- method and schedule (rounds per task = num-server-rounds / num-tasks)
        "method": C.Option("fedta"),  # choices from the method table (fedta.methods)
        "num-tasks": C.Option(5, C.positive, "tasks > 0"),
        "classes-per-task": C.Option(2, C.positive, "classes per task > 0"),
        "fedavg-lr": C.Option(0.001, C.positive, "Adam learning rate > 0 (fedavg full fine-tune)"),
        # --- data
        "task-order": C.Option("random", choices=("random", "same")),
        "samples-per-class": C.Option(300, C.positive, "images per class over all clients > 0"),
        "min-samples": C.Option(10, C.positive, "images per class per client > 0"),
        "test-per-class": C.Option(100, C.positive, "test images per class > 0"),
        "pretrain-size": C.Option(40000, C.positive, "pre-training images > 0"),
        "pretrain-epochs": C.Option(15, C.positive, "pre-training epochs > 0"),
        "pretrain-augment": C.Option(True, help="random 2-pixel shifts and mirrors"),
        "surrogate-per-class": C.Option(20, C.positive, "surrogate images per class > 0"),
        # --- backbone
        "vit-patch": C.Option(7, lambda v: v in (2, 4, 7, 14), "patch size dividing 28"),
        "vit-dim": C.Option(96, C.positive, "embedding dim > 0"),
        "vit-depth": C.Option(4, C.positive, "transformer blocks > 0"),
        "vit-heads": C.Option(4, C.positive, "attention heads > 0 dividing vit-dim"),
        # --- FedTA client
        "pool-size": C.Option(10, C.positive, "prompt pool entries M > 0"),
        "prompt-length": C.Option(2, C.positive, "tokens per prompt > 0"),
        "top-n": C.Option(3, C.positive, "prompts selected per input N > 0"),
        "num-anchors": C.Option(20, C.positive, "tail anchors > 0"),
        "mix": C.Option("add", choices=("add", "gated")),
        "lambda1": C.Option(1.0, C.non_negative, "key-matching weight >= 0"),
        "lambda2": C.Option(1.0, C.non_negative, "prototype contrastive weight >= 0"),
        "lambda3": C.Option(1.0, C.non_negative, "anchor-key weight >= 0"),
        "tau": C.Option(0.1, C.positive, "temperature > 0"),
        "classifier": C.Option("prototype", choices=("prototype", "head")),
        # --- FedTA server
        "sikf-steps": C.Option(5, C.non_negative, "SIKF Adam steps >= 0"),
        "sikf-lr": C.Option(0.001, C.positive, "SIKF learning rate > 0"),
        "bgps-thr": C.Option(0.5, lambda v: -1 <= v <= 1, "threshold in [-1, 1]"),
        "bgps-warmup": C.Option(1, C.non_negative, "rounds of a task before BGPS may freeze >= 0"),
        # the run-level warm-up, read by the rows with the flag run-warmup (fedta-warmup)
        "bgps-start-round": C.Option(4, C.positive, "first server round BGPS may freeze in > 0"),
    },
    num_server_rounds=10,
    fraction_evaluate=1.0,
    partitioner=PARTITIONER,
    local_epochs=2,
    lr=0.01,
)


def one_thread() -> None:
    """Compute with one torch thread (server and clients).

    Measured: with two intra-op threads the same FedTA run (same seed, ``launcher=local``, one
    process) gave different accuracies from run to run (acc_t5 0.7144 vs 0.6638 for seed 1), with
    ``MKL_DYNAMIC=FALSE`` and a fixed ``PYTHONHASHSEED`` too; with one thread two runs were
    bitwise equal. Some multi-threaded CPU kernel of the ViT/prompt computations reduces in an
    order that varies, and FedTA's discrete steps (top-N prompt selection, BGPS's argmin,
    freezing) amplify the last-bit differences. The models are tiny, so one thread costs little.
    """
    torch.set_num_threads(1)


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one-line :class:`~flowerbed.common.config.ConfigError`) and
    resolve ``method`` in the app's method table; ``cfg["rounds-per-task"]`` is derived (1 when
    ``num-server-rounds`` < ``num-tasks``: the run then covers the first tasks only)."""
    from fedta.methods import METHODS

    cfg = C.parse(run_config, {**SCHEMA, "method": METHODS.option("fedta")}, methods=METHODS)
    short = cfg["num-server-rounds"] < cfg["num-tasks"]  # a short run: the first tasks only
    if not short and cfg["num-server-rounds"] % cfg["num-tasks"]:
        raise C.ConfigError(
            f"run config num-server-rounds={cfg['num-server-rounds']!r}: must be a multiple of "
            f"num-tasks={cfg['num-tasks']} (rounds per task = num-server-rounds / num-tasks)"
        )
    if cfg["vit-dim"] % cfg["vit-heads"]:
        raise C.ConfigError(
            f"run config vit-heads={cfg['vit-heads']!r}: must divide vit-dim={cfg['vit-dim']}"
        )
    if cfg["top-n"] > cfg["pool-size"]:
        raise C.ConfigError(f"run config top-n={cfg['top-n']!r}: must be <= pool-size")
    if cfg["num-tasks"] * cfg["classes-per-task"] > 10:
        raise C.ConfigError(
            f"run config num-tasks={cfg['num-tasks']} x classes-per-task="
            f"{cfg['classes-per-task']} exceeds the 10 Fashion-MNIST classes"
        )
    # fewer rounds than tasks (a smoke run, `num-server-rounds=1`): one round on each of the first
    # num-server-rounds tasks; otherwise every task gets num-server-rounds / num-tasks rounds
    cfg["rounds-per-task"] = 1 if short else cfg["num-server-rounds"] // cfg["num-tasks"]
    return cfg


NUM_CLASSES = 10


# ---------------------------------------------------------------------------- parameters
def _t(record: ArrayRecord, key: str) -> torch.Tensor:
    return torch.from_numpy(record[key].numpy().copy())


def record_of(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(v.detach().cpu().contiguous().numpy()) for k, v in tensors.items()}
    )


def tensors_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: _t(record, k) for k in record.keys()}


def initial_global(cfg: dict[str, Any], backbone: TinyViT) -> dict[str, torch.Tensor]:
    """The server's initial shared parameters of ``cfg.method`` (seeded)."""
    set_seed(derive_seed(cfg["seed"], 0x1417))
    d, m = backbone.dim, cfg["pool-size"]
    out: dict[str, torch.Tensor] = {}
    method = cfg.method
    if method.flag("prototypes") or method.flag("prompts"):
        out["prompts"] = torch.randn(m, cfg["prompt-length"], d) * 0.1
        out["keys"] = torch.randn(m, d)
    if method.flag("head"):
        head = torch.nn.Linear(d, NUM_CLASSES)
        out["head.weight"], out["head.bias"] = head.weight.data, head.bias.data
    if method.flag("finetune"):
        out.update({f"vit.{k}": v.clone() for k, v in backbone.state_dict().items()})
    return out


def initial_personal(cfg: dict[str, Any], dim: int, partition_id: int) -> dict[str, torch.Tensor]:
    """A FedTA client's private parameters: tail anchors, their keys, gate, head (never sent)."""
    set_seed(derive_seed(cfg["seed"], partition_id, 0x7A11))
    head = torch.nn.Linear(dim, NUM_CLASSES)
    return {
        "ta": torch.randn(cfg["num-anchors"], dim) * 0.02,
        "ta_keys": torch.randn(cfg["num-anchors"], dim),
        "gate": torch.zeros(1),
        "head.weight": head.weight.data,
        "head.bias": head.bias.data,
    }


# ---------------------------------------------------------------------------- model pieces
def mix(f_out: torch.Tensor, anchor: torch.Tensor, gate: torch.Tensor, how: str) -> torch.Tensor:
    """Mixing operator of Eq. 4-5 (Reconstruction): ``add`` F_out + TA, ``gated`` with sigmoid."""
    if how == "add":
        return f_out + anchor
    return f_out + torch.sigmoid(gate) * anchor


def select_anchor(f_out: torch.Tensor, ta_keys: torch.Tensor) -> torch.Tensor:
    """Eq. 4: per sample, the index of the anchor key at the smallest cosine distance."""
    sim = F.normalize(f_out, dim=-1) @ F.normalize(ta_keys, dim=-1).T
    return sim.argmax(dim=1)


def prototype_logits(f: torch.Tensor, protos: dict[int, torch.Tensor], tau: float):
    """``cos(f, G^c) / tau`` over the classes of ``protos`` (10 columns, -inf elsewhere)."""
    logits = torch.full((f.shape[0], NUM_CLASSES), float("-inf"))
    if protos:
        cls = sorted(protos)
        g = F.normalize(torch.stack([protos[c] for c in cls]), dim=-1)
        logits[:, cls] = F.normalize(f, dim=-1) @ g.T / tau
    return logits


def contrastive_loss(f_ta, y, protos: dict[int, torch.Tensor], tau: float) -> torch.Tensor:
    """Eq. 5 on the samples whose class has a global prototype (cosine similarities)."""
    if not protos:
        return f_ta.sum() * 0.0
    logits = prototype_logits(f_ta, protos, tau)
    has = torch.tensor([int(c) in protos for c in y])
    if not has.any():
        return f_ta.sum() * 0.0
    return F.cross_entropy(logits[has], y[has])


def ie_loss(logits, y, query, selected_keys, lambda1: float) -> torch.Tensor:
    """Eq. 3: ``CE(logits, y) + lambda1 * mean_b sum_s dis(K_in, K_s)`` (cosine distance of the
    query ``(B, D)`` to each of its selected keys ``(B, N, D)``; the pull of keys to queries)."""
    pull = cosine_distance(query[:, None, :], selected_keys).sum(1).mean()
    return F.cross_entropy(logits, y) + lambda1 * pull


def ta_loss(logits, y, f_ta, anchor_keys, protos, tau: float, lambda2: float, lambda3: float):
    """Eq. 6: ``CE(logits, y) + lambda2 * L_cons (Eq. 5) + lambda3 * mean_b dis(F_TA, K_s^ta)``
    (``anchor_keys`` ``(B, D)``: the key of each sample's selected anchor)."""
    return (
        F.cross_entropy(logits, y)
        + lambda2 * contrastive_loss(f_ta, y, protos, tau)
        + lambda3 * cosine_distance(f_ta, anchor_keys).mean()
    )


def masked(logits: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Logits with every class outside ``classes`` set to -inf."""
    mask = torch.full((NUM_CLASSES,), float("-inf"))
    mask[list(classes)] = 0.0
    return logits + mask


def _batches(n: int, bs: int, gen: torch.Generator):
    return torch.randperm(n, generator=gen).split(bs)


@dataclass
class LocalResult:
    """What one local training call produces."""

    upload: dict[str, torch.Tensor]  # shared parameters sent to the server
    personal: dict[str, torch.Tensor] = field(default_factory=dict)  # kept on the client
    protos: dict[int, torch.Tensor] = field(default_factory=dict)  # Eq. 7
    proto_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # matched TA keys
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------- FedTA client
def fedta_features(
    cfg, backbone, shared, personal, x, use_ta: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(F_TA, F_out, anchor index)`` of ``x`` (no gradients)."""
    with torch.no_grad():
        e = backbone.embed(x)
        q = backbone.features(e)
        f_out, _ = prompted_features(
            backbone, e, q, shared["prompts"], shared["keys"], cfg["top-n"]
        )
        if not use_ta:
            return f_out, f_out, torch.zeros(len(x), dtype=torch.long)
        j = select_anchor(f_out, personal["ta_keys"])
        return mix(f_out, personal["ta"][j], personal["gate"], cfg["mix"]), f_out, j


def train_fedta(
    cfg, backbone, shared, personal, protos, x, y, gen, use_ta: bool = True
) -> LocalResult:
    """Stage 1 (Eq. 3) on the prompt pool, keys and head; stage 2 (Eq. 6) on the anchors."""
    prompts = shared["prompts"].clone().requires_grad_(True)
    keys = shared["keys"].clone().requires_grad_(True)
    personal = {k: v.clone().requires_grad_(True) for k, v in personal.items()}
    head_params = [personal["head.weight"], personal["head.bias"]]
    n = len(x)
    with torch.no_grad():
        e_all = backbone.embed(x)
        q_all = backbone.features(e_all)
    # ---- stage 1: Input Enhancement (Eq. 3)
    opt = torch.optim.Adam([prompts, keys, *head_params], lr=cfg["lr"])
    l1 = 0.0
    for _ in range(cfg["local-epochs"]):
        for idx in _batches(n, cfg["batch-size"], gen):
            e, q = e_all[idx], q_all[idx]
            f_out, sel = prompted_features(backbone, e, q, prompts, keys, cfg["top-n"])
            loss = ie_loss(F.linear(f_out, *head_params), y[idx], q, keys[sel], cfg["lambda1"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            l1 = loss.item()
    prompts, keys = prompts.detach(), keys.detach()
    with torch.no_grad():
        f_out_all, _ = prompted_features(backbone, e_all, q_all, prompts, keys, cfg["top-n"])
    # ---- stage 2: Tail Anchors (Eqs. 4-6), prompt pool frozen
    l2 = 0.0
    if use_ta:
        opt = torch.optim.Adam(
            [personal["ta"], personal["ta_keys"], personal["gate"], *head_params], lr=cfg["lr"]
        )
        for _ in range(cfg["local-epochs"]):
            for idx in _batches(n, cfg["batch-size"], gen):
                f_out = f_out_all[idx]
                j = select_anchor(f_out, personal["ta_keys"].detach())
                f_ta = mix(f_out, personal["ta"][j], personal["gate"], cfg["mix"])
                loss = ta_loss(
                    F.linear(f_ta, *head_params),
                    y[idx],
                    f_ta,
                    personal["ta_keys"][j],
                    protos,
                    cfg["tau"],
                    cfg["lambda2"],
                    cfg["lambda3"],
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                l2 = loss.item()
    personal = {k: v.detach() for k, v in personal.items()}
    # ---- local prototypes (Eq. 7) and the anchor key each class matched most
    with torch.no_grad():
        if use_ta:
            j = select_anchor(f_out_all, personal["ta_keys"])
            f_ta = mix(f_out_all, personal["ta"][j], personal["gate"], cfg["mix"])
        else:
            j, f_ta = torch.zeros(n, dtype=torch.long), f_out_all
    local_protos, proto_keys = {}, {}
    for c in sorted(set(y.tolist())):
        sel = y == c
        local_protos[c] = f_ta[sel].mean(0)
        if use_ta:
            proto_keys[c] = personal["ta_keys"][torch.bincount(j[sel]).argmax()]
    return LocalResult(
        upload={"prompts": prompts, "keys": keys},
        personal=personal,
        protos=local_protos,
        proto_keys=proto_keys,
        metrics={"loss_stage1": l1, "loss_stage2": l2},
    )


# ---------------------------------------------------------------------------- baselines
def baseline_forward(cfg, backbone, params, x):
    """Logits of l2p / fedvit / fedavg (and the key-pull term of l2p)."""
    head = (params["head.weight"], params["head.bias"])
    if cfg.method.flag("finetune"):
        vit = params["_vit"]
        return F.linear(vit.features(vit.embed(x)), *head), None
    with torch.no_grad():
        e = backbone.embed(x)
        q = backbone.features(e)
    if not cfg.method.flag("prompts"):
        return F.linear(q, *head), None
    f, sel = prompted_features(backbone, e, q, params["prompts"], params["keys"], cfg["top-n"])
    pull = cosine_distance(q[:, None, :], params["keys"][sel]).sum(1).mean()
    return F.linear(f, *head), pull


def _vit_from(backbone: TinyViT, shared: dict[str, torch.Tensor]) -> TinyViT:
    import copy

    vit = copy.deepcopy(backbone)
    vit.load_state_dict({k[4:]: v for k, v in shared.items() if k.startswith("vit.")})
    vit.train()
    for p in vit.parameters():
        p.requires_grad_(True)
    return vit


def train_baseline(cfg, backbone, shared, x, y, gen) -> LocalResult:
    """Cross-entropy on the current task (plus the L2P key pull) of the shared parameters."""
    params = {
        k: v.clone().requires_grad_(True) for k, v in shared.items() if not k.startswith("vit.")
    }
    trainable = list(params.values())
    lr = cfg["lr"]
    if cfg.method.flag("finetune"):
        params["_vit"] = _vit_from(backbone, shared)
        trainable += list(params["_vit"].parameters())
        lr = cfg["fedavg-lr"]
    opt = torch.optim.Adam(trainable, lr=lr)
    loss_value = 0.0
    for _ in range(cfg["local-epochs"]):
        for idx in _batches(len(x), cfg["batch-size"], gen):
            logits, pull = baseline_forward(cfg, backbone, params, x[idx])
            loss = F.cross_entropy(logits, y[idx])
            if pull is not None:
                loss = loss + cfg["lambda1"] * pull
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = loss.item()
    upload = {k: v.detach() for k, v in params.items() if k != "_vit"}
    if cfg.method.flag("finetune"):
        upload.update({f"vit.{k}": v.detach() for k, v in params["_vit"].state_dict().items()})
    return LocalResult(upload=upload, metrics={"loss": loss_value})


# ---------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict(
    cfg,
    backbone,
    shared: dict[str, torch.Tensor],
    personal: dict[str, torch.Tensor],
    protos: dict[int, torch.Tensor],
    seen: list[int],
    x: torch.Tensor,
    batch: int = 512,
) -> torch.Tensor:
    """Predicted classes of ``x``, restricted to ``seen`` (FedTA: classes with prototypes)."""
    method = cfg.method
    out = []
    params = dict(shared)
    if method.flag("finetune"):
        params["_vit"] = _vit_from(backbone, shared).eval()
    for xb in x.split(batch):
        if method.flag("prototypes"):
            f_ta, _, _ = fedta_features(
                cfg, backbone, shared, personal, xb, use_ta=method.flag("ta")
            )
            if cfg["classifier"] == "prototype":
                logits = prototype_logits(f_ta, {c: protos[c] for c in seen if c in protos}, 1.0)
            else:
                logits = masked(
                    F.linear(f_ta, personal["head.weight"], personal["head.bias"]), seen
                )
        else:
            logits = masked(baseline_forward(cfg, backbone, params, xb)[0], seen)
        out.append(logits.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean()) if len(y) else float("nan")


def protos_to_record(protos: dict[int, torch.Tensor], keys: dict[int, torch.Tensor]) -> ArrayRecord:
    t = {f"p.{c}": v for c, v in protos.items()}
    t.update({f"k.{c}": v for c, v in keys.items()})
    return record_of(t)


def protos_from_record(record: ArrayRecord, prefix: str = "g.") -> dict[int, torch.Tensor]:
    return {int(k[len(prefix) :]): _t(record, k) for k in record.keys() if k.startswith(prefix)}


def nvalues(tensors: dict[str, torch.Tensor]) -> int:
    return int(sum(v.numel() for v in tensors.values()))


def as_list(seq) -> list[int]:
    return [int(c) for c in seq]
