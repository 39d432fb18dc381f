"""FL-LLaMA app: run-config schema, the LoRA'd split model of each side, the client's three
phases, the server's block B, the evaluation harness and the centralized LoRA baseline.

Client state between the phases of a step lives in ``context.state`` (the A/C adapter and the
two AdamW states, as ArrayRecords); the client recomputes A's forward in ``train.a`` instead of
keeping an autograd graph between calls (same gradient: the noise is additive). The model object
itself is cached per process (loading only), its adapter is loaded from the state at each call.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord

from flllama import data as D
from flllama.model import (
    NAMES,
    TINY,
    ModelOptionError,
    build_model,
    check_model,
    task_tokenizer_source,
)
from flllama.split import (
    SplitLlama,
    add_lora,
    add_noise,
    block_lora,
    layer_of,
    lm_loss,
    load_lora,
    private_grad,
    split_generate,
)
from flowerbed.common import config as C
from flowerbed.common.seeding import derive_seed
from flowerbed.common.train import get_device


def _unit(v) -> bool:
    return 0 < v <= 1


SCHEMA: dict[str, C.Option] = C.compose(
    C.SCHEDULE,
    {"partitioner": C.DATA["partitioner"]},
    C.DEVICE,
    C.RESULTS,
    {
        "method": C.Option("split-sequential"),  # choices from the method table
        "model": C.Option(
            "smollm2-135m",
            lambda v: bool(v.strip()),
            f"{' | '.join(NAMES)} | the path of a prepared LlamaForCausalLM folder or .gguf file",
        ),
        "split-a": C.Option(1, C.positive, "decoder layers in block A (p) > 0"),
        "split-c": C.Option(1, C.positive, "decoder layers in block C (q) > 0"),
        "lora-rank": C.Option(8, C.positive, "LoRA rank > 0"),
        "lora-alpha": C.Option(16.0, C.positive, "LoRA alpha > 0"),
        "lr": C.Option(2e-4, C.positive, "AdamW learning rate > 0"),
        "weight-decay": C.Option(0.01, C.non_negative, "AdamW weight decay >= 0"),
        "grad-clip": C.Option(1.0, C.positive, "per-block gradient norm clip > 0"),
        "batch-size": C.Option(4, C.positive, "examples per client and step > 0"),
        "max-chars": C.Option(200, C.positive, "characters of the summary in the prompt > 0"),
        "sync-steps": C.Option(5, C.positive, "split steps per round (A/C averaged after) > 0"),
        "client-lr-scale": C.Option(
            1.0, C.positive, "A/C learning rate = lr * this (a control; 1 = the paper) > 0"
        ),
        "sync-every": C.Option(
            0, C.non_negative, "A/C also averaged every this many steps in a round (0: no) >= 0"
        ),
        "sigma": C.Option(0.0, C.non_negative, "hidden-state noise setting >= 0"),
        "noise-mean-abs": C.Option(True, help="true: std = sigma*sqrt(pi/2), E|noise| = sigma"),
        "grad-dp-clip": C.Option(
            0.0, C.non_negative, "per-sample L2 clip of dL/dh_B (0: no gradient DP) >= 0"
        ),
        "grad-dp-noise": C.Option(
            0.0, C.non_negative, "gradient DP noise std = this * grad-dp-clip >= 0"
        ),
        "mask-compression": C.Option(True, help="send non-pad counts instead of 4-D masks"),
        "task": C.Option("topic", choices=D.TASKS, help="topic (cloze) | title (generation)"),
        "title-tokens": C.Option(
            16, C.positive, "task title: max new tokens of the generated title (eval) > 0"
        ),
        "eval-samples": C.Option(48, C.positive, "test examples of the server-side eval > 0"),
        "gen-tokens": C.Option(
            0, C.non_negative, "tokens generated per test prompt for gen_accuracy (0: none) >= 0"
        ),
        "temperature": C.Option(
            0.0, C.non_negative, "generation: 0 = greedy, > 0 = sampling (paper: 0.1) >= 0"
        ),
        "top-p": C.Option(0.95, _unit, "generation: top-p nucleus mass in (0, 1] (paper: 0.95)"),
    },
    num_server_rounds=4,
    partitioner="topic",
)

ADAM = {"betas": (0.9, 0.999), "eps": 1e-5}  # the authors' script defaults


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one line naming a bad key or value) and resolve ``method``."""
    from flllama.methods import METHODS

    cfg = C.parse(
        run_config, {**SCHEMA, "method": METHODS.option("split-sequential")}, methods=METHODS
    )
    try:
        check_model(cfg["model"])
    except ModelOptionError as e:
        raise C.ConfigError(f"run config {e}") from None
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise C.ConfigError("run config device='cuda': no CUDA device here (use auto or cpu)")
    if cfg["grad-dp-noise"] > 0 and cfg["grad-dp-clip"] <= 0:
        raise C.ConfigError(
            f"run config grad-dp-noise={cfg['grad-dp-noise']}: needs grad-dp-clip > 0"
        )
    return cfg


# ---------------------------------------------------------------------------- models and data
@lru_cache(maxsize=2)
def _lora_model(name: str, seed: int, rank: int, alpha: float, device: str):
    # a named random config is built on the device itself (a 7B model never sits on the CPU)
    model = add_lora(build_model(name, seed, device), rank, alpha, derive_seed(seed, 0x10A))
    # the adapters at creation: the cached model is trained in place by later calls (every
    # caller loads the adapters it needs first), so the run's start comes from this copy
    model.initial_lora = {
        n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n
    }
    return model


def lora_model(cfg):
    """The LoRA'd model, identical in every process (base from ``seed`` or the cache; LoRA's A
    matrices from ``derive_seed(seed, 0x10A)``), on the run's device, cached per process:
    callers load adapters."""
    dev = get_device(cfg["device"])
    m = _lora_model(
        cfg["model"], int(cfg["seed"]), int(cfg["lora-rank"]), cfg["lora-alpha"], str(dev)
    )
    return m.to(dev)


def split_of(cfg, model=None) -> SplitLlama:
    return SplitLlama(lora_model(cfg) if model is None else model, cfg["split-a"], cfg["split-c"])


@lru_cache(maxsize=2)
def _tokenizer(name: str):
    return D.CharTokenizer() if name == TINY else D.HFTaskTokenizer(task_tokenizer_source(name))


def tokenizer(cfg):
    return _tokenizer(cfg["model"])


def rows():
    return D.load_summaries()


@lru_cache(maxsize=8)
def _pools(num_partitions: int) -> tuple[np.ndarray, ...]:
    r = rows()
    train, _ = D.split(r)
    train = np.asarray(train)
    labels = np.asarray([r[i][2] for i in train])
    return tuple(train[D.topic_partition(labels, p, num_partitions)] for p in range(num_partitions))


def client_pool(pid: int, num_partitions: int) -> np.ndarray:
    """Row indices of client ``pid``'s training examples (topic split)."""
    return _pools(num_partitions)[pid]


def client_batch(cfg, pid: int, num_partitions: int, rnd: int, step: int) -> dict:
    """Client ``pid``'s batch of (round, step): seeded by (seed, pid, round, step)."""
    idx = D.batch_indices(
        client_pool(pid, num_partitions), cfg["batch-size"], cfg["seed"], pid, rnd, step
    )
    dev = get_device(cfg["device"])
    batch = D.make_batch(tokenizer(cfg), rows(), idx, cfg["max-chars"], cfg["task"])
    return {k: v.to(dev) for k, v in batch.items()}


def initial_arrays(cfg) -> ArrayRecord:
    """Every block's adapter at the start (the global A/C part and the server's B part)."""
    return ArrayRecord(dict(lora_model(cfg).initial_lora))


def _params(model, layers) -> list[torch.nn.Parameter]:
    want = set(layers)
    return [p for n, p in model.named_parameters() if "lora_" in n and layer_of(n) in want]


# ---------------------------------------------------------------------------- optimizer state
def adamw(
    params, cfg, state: ArrayRecord | None = None, lr_scale: float = 1.0
) -> torch.optim.AdamW:
    """AdamW over ``params`` (the authors' betas/eps, learning rate ``lr * lr_scale``), with its
    state from a record if any."""
    lr = cfg["lr"] * lr_scale
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg["weight-decay"], **ADAM)
    if state is not None and len(state):
        sd = opt.state_dict()
        per = {}
        for key, arr in state.items():
            i, name = key.split(".", 1)
            per.setdefault(int(i), {})[name] = torch.from_numpy(arr.numpy().copy())
        sd["state"] = per
        opt.load_state_dict(sd)
    return opt


def adamw_record(opt: torch.optim.AdamW) -> ArrayRecord:
    """The optimizer's per-parameter state as an ArrayRecord (``<index>.<field>``)."""
    return ArrayRecord(
        {
            f"{i}.{k}": v.detach().cpu().reshape(v.shape).clone()
            for i, st in opt.state_dict()["state"].items()
            for k, v in st.items()
        }
    )


# ---------------------------------------------------------------------------- client phases
def _load_state_lora(model, state) -> None:
    if "lora" in state:
        load_lora(model, {k: torch.from_numpy(v.numpy()) for k, v in state["lora"].items()})


def client_forward(cfg, state, pid, n, rnd, step, lora: ArrayRecord | None) -> dict:
    """Phase 1: (load the global adapter,) A's forward on the batch, noise; returns what is sent:
    ``h`` (b, L, d) float32 and ``counts``."""
    if lora is not None:
        state["lora"] = lora
    model = lora_model(cfg)
    _load_state_lora(model, state)
    s = split_of(cfg, model)
    batch = client_batch(cfg, pid, n, rnd, step)
    with torch.no_grad():
        h = s.forward_a(batch["input_ids"], batch["counts"])
    h = add_noise(
        h, cfg["sigma"], cfg["noise-mean-abs"], derive_seed(cfg["seed"], pid, rnd, step, 0x4E)
    )
    return {"h": h.float().cpu().numpy(), "counts": batch["counts"].cpu().numpy()}


def _save(state, model, s, opt_key, opt) -> None:
    layers = [*s.a_layers, *s.c_layers]
    state["lora"] = ArrayRecord({k: v.cpu() for k, v in block_lora(model, layers).items()})
    state[opt_key] = adamw_record(opt)


def _block(cfg, state, pid, n, rnd, step, block: str):
    """The model with this client's adapter, the step's batch, and block ``a`` or ``c``'s
    parameters with their AdamW (state from ``context.state``)."""
    model = lora_model(cfg)
    _load_state_lora(model, state)
    s = split_of(cfg, model)
    params = _params(model, s.a_layers if block == "a" else s.c_layers)
    opt = adamw(params, cfg, state.get(f"opt-{block}"), cfg["client-lr-scale"])
    return model, s, client_batch(cfg, pid, n, rnd, step), params, opt


def client_c(cfg, state, pid, n, rnd, step, h_b: np.ndarray) -> tuple[np.ndarray, float]:
    """Phase 2: C's forward and the loss on h_B, backward, clip, AdamW step on C; dL/dh_B (with
    ``grad-dp-clip`` > 0: per-sample clipped and noised, :func:`flllama.split.private_grad`; C's
    own update uses the exact gradient)."""
    model, s, batch, params, opt = _block(cfg, state, pid, n, rnd, step, "c")
    dev = batch["input_ids"].device
    hb = torch.from_numpy(np.asarray(h_b, dtype=np.float32)).to(dev).requires_grad_(True)
    loss = lm_loss(s.forward_c(hb, batch["counts"]), batch["labels"])
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg["grad-clip"])
    opt.step()
    _save(state, model, s, "opt-c", opt)
    grad = private_grad(
        hb.grad.detach(),
        batch["counts"],
        cfg["grad-dp-clip"],
        cfg["grad-dp-noise"],
        derive_seed(cfg["seed"], pid, rnd, step, 0x6D50),
    )
    return grad.cpu().numpy(), float(loss.item())


def client_a(cfg, state, pid, n, rnd, step, grad_a: np.ndarray) -> None:
    """Phase 3: A's forward again (same batch), backward with dL/dh_A, clip, AdamW step on A."""
    model, s, batch, params, opt = _block(cfg, state, pid, n, rnd, step, "a")
    h = s.forward_a(batch["input_ids"], batch["counts"])
    opt.zero_grad()
    h.backward(torch.from_numpy(np.asarray(grad_a, dtype=np.float32)).to(h.device))
    torch.nn.utils.clip_grad_norm_(params, cfg["grad-clip"])
    opt.step()
    _save(state, model, s, "opt-a", opt)


# ---------------------------------------------------------------------------- the server's B
class TorchServerBlock:
    """Block B of the server (:class:`flowerbed.strategies.fl_llama.ServerBlock`): one replica
    (a copy of the LoRA'd model whose B adapter and AdamW are its own) per client in
    server-hierarchical mode, one otherwise."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.replicas: list = []
        self.opts: list = []
        self._graph: dict[int, tuple] = {}
        self._replica(0)

    def _replica(self, i: int):
        while len(self.replicas) <= i:
            model = copy.deepcopy(lora_model(self.cfg))
            if self.replicas:
                load_lora(model, block_lora(self.replicas[0].model, self.replicas[0].b_layers))
            s = split_of(self.cfg, model)
            self.replicas.append(s)
            self.opts.append(adamw(_params(model, s.b_layers), self.cfg))
        return self.replicas[i]

    def forward(self, h: np.ndarray, counts: np.ndarray, replica: int = 0) -> np.ndarray:
        s = self._replica(replica)
        dev = get_device(self.cfg["device"])
        x = torch.from_numpy(np.asarray(h, dtype=np.float32)).to(dev).requires_grad_(True)
        out = s.forward_b(x, torch.as_tensor(counts).to(dev))
        self._graph[replica] = (x, out)
        return out.detach().cpu().numpy()

    def backward(self, grad: np.ndarray, replica: int = 0) -> np.ndarray:
        x, out = self._graph.pop(replica)
        s, opt = self.replicas[replica], self.opts[replica]
        opt.zero_grad()
        out.backward(torch.from_numpy(np.asarray(grad, dtype=np.float32)).to(out.device))
        torch.nn.utils.clip_grad_norm_(_params(s.model, s.b_layers), self.cfg["grad-clip"])
        opt.step()
        return x.grad.detach().cpu().numpy()

    def lora(self) -> ArrayRecord:
        s = self.replicas[0]
        return ArrayRecord({k: v.cpu() for k, v in block_lora(s.model, s.b_layers).items()})

    def set_lora(self, record: ArrayRecord) -> None:
        t = {k: torch.from_numpy(v.numpy()) for k, v in record.items()}
        for s in self.replicas:
            load_lora(s.model, t)

    def average_replicas(self, weights: Sequence[float]) -> None:
        from flllama.split import average_lora

        reps = self.replicas[: len(weights)]
        avg = average_lora([block_lora(s.model, s.b_layers) for s in reps], list(weights))
        for s in self.replicas:
            load_lora(s.model, avg)


# ---------------------------------------------------------------------------- harness
def _full_model(cfg, arrays: ArrayRecord):
    model = lora_model(cfg)
    load_lora(model, {k: torch.from_numpy(v.numpy()) for k, v in arrays.items()})
    return model


SERVER_PARTITION = 0xFFFF  # the "partition" key of the server-side harness's sampling seeds


def sample_seed(seed: int, partition: int, server_round: int, batch: int = 0) -> int:
    """The generation sampler's seed: a function of (run seed, partition, round) and the batch
    number only."""
    return derive_seed(seed, partition, server_round, batch, 0x5A3B)


def generated_accuracy(cfg, s: SplitLlama, idx, server_round: int) -> float:
    """Fraction of the test examples ``idx`` whose ``gen-tokens`` generated tokens (greedy, or
    sampled at ``temperature`` / ``top-p``) start with the target topic's tokens (compared over
    min(gen-tokens, target length) tokens)."""
    hits = 0
    dev = get_device(cfg["device"])
    for k, start in enumerate(range(0, len(idx), 16)):
        b = D.make_prompt_batch(tokenizer(cfg), rows(), idx[start : start + 16], cfg["max-chars"])
        out = split_generate(
            s,
            s,
            b["input_ids"].to(dev),
            b["counts"].to(dev),
            cfg["gen-tokens"],
            temperature=cfg["temperature"],
            top_p=cfg["top-p"],
            seed=sample_seed(cfg["seed"], SERVER_PARTITION, server_round, k),
        ).cpu()
        for row, target in zip(out.tolist(), b["targets"], strict=True):
            n = min(len(row), len(target))
            hits += int(row[:n] == target[:n])
    return hits / len(idx)


def generated_titles(cfg, s: SplitLlama, idx) -> list[tuple[str, str]]:
    """``(generated, gold)`` titles of the test examples ``idx``: greedy generation of up to
    ``title-tokens`` tokens through the split model with the KV cache on both sides, cut at the
    first end token, decoded."""
    tok, dev, out = tokenizer(cfg), get_device(cfg["device"]), []
    for start in range(0, len(idx), 16):
        chunk = idx[start : start + 16]
        b = D.make_prompt_batch(tok, rows(), chunk, cfg["max-chars"], "title")
        new = split_generate(
            s, s, b["input_ids"].to(dev), b["counts"].to(dev), cfg["title-tokens"]
        ).cpu()
        for i, row in zip(chunk, new.tolist(), strict=True):
            out.append((tok.decode(D.cut_at(row, tok.end)), rows()[int(i)][0]))
    return out


def title_metrics(pairs: Sequence[tuple[str, str]]) -> dict:
    """Mean exact match and token F1 (:func:`flllama.data.title_scores`) over the pairs."""
    scores = np.asarray([D.title_scores(p, g) for p, g in pairs], dtype=float)
    return {"exact_match": float(scores[:, 0].mean()), "token_f1": float(scores[:, 1].mean())}


def eval_indices(cfg) -> np.ndarray:
    """The ``eval-samples`` test examples of the harness: every k-th test row, in order."""
    _, test = D.split(rows())
    return np.asarray(test)[:: max(len(test) // cfg["eval-samples"], 1)][: cfg["eval-samples"]]


def evaluator(cfg):
    """``evaluate(round, arrays) -> {"loss", ...}`` on ``eval-samples`` test examples: the target
    loss, and for task ``topic`` the topic accuracy (argmax over the 12 topics' first tokens
    after the prompt; with ``gen-tokens`` > 0 also ``gen_accuracy``,
    :func:`generated_accuracy`), for task ``title`` the exact match and token F1 of the greedy
    titles (:func:`generated_titles`). An experiment harness: the server assembles A/C
    (averaged) and B in one process."""
    idx = eval_indices(cfg)

    @torch.no_grad()
    def evaluate(server_round: int, arrays: ArrayRecord) -> dict:
        model = _full_model(cfg, arrays)
        s = split_of(cfg, model)
        tok = tokenizer(cfg)
        cand = torch.tensor(tok.topic_tokens())
        losses, hits, n = [], 0, 0
        for start in range(0, len(idx), 16):
            b = D.make_batch(tok, rows(), idx[start : start + 16], cfg["max-chars"], cfg["task"])
            dev = get_device(cfg["device"])
            b = {k: v.to(dev) for k, v in b.items()}
            logits = s.forward_c(
                s.forward_b(s.forward_a(b["input_ids"], b["counts"]), b["counts"]), b["counts"]
            )
            losses.append(lm_loss(logits, b["labels"]).item() * len(b["counts"]))
            # the position predicting the first target token
            first = (b["labels"] != -100).float().argmax(-1) - 1
            pick = logits[torch.arange(len(first), device=dev), first][:, cand.to(dev)]
            hits += int((pick.argmax(-1).cpu() == b["topic"].cpu()).sum())
            n += len(b["counts"])
        if cfg["task"] == "title":
            return {
                "loss": float(np.sum(losses) / n),
                **title_metrics(generated_titles(cfg, s, idx)),
            }
        out = {"loss": float(np.sum(losses) / n), "accuracy": hits / n}
        if cfg["gen-tokens"] > 0:
            out["gen_accuracy"] = generated_accuracy(cfg, s, idx, server_round)
        return out

    return evaluate


def central_fit(cfg, num_partitions: int):
    """``fit(round, arrays)`` of the centralized LoRA baseline: the same batches as the split
    run (each client's batch of each step, in the same order), one AdamW step per batch on the
    whole model, gradient clipped per block as the split run does. AdamW state kept across
    rounds."""
    held: dict = {}

    def fit(server_round: int, arrays: ArrayRecord):
        model = _full_model(cfg, arrays)
        s = split_of(cfg, model)
        blocks = [_params(model, layers) for layers in (s.a_layers, s.b_layers, s.c_layers)]
        if not held:
            held["opts"] = [adamw(p, cfg) for p in blocks]
        losses = []
        for step in range(cfg["sync-steps"]):
            for pid in range(num_partitions):
                b = client_batch(cfg, pid, num_partitions, server_round, step)
                logits = s.forward_c(
                    s.forward_b(s.forward_a(b["input_ids"], b["counts"]), b["counts"]), b["counts"]
                )
                loss = lm_loss(logits, b["labels"])
                for o in held["opts"]:
                    o.zero_grad()
                loss.backward()
                for p, o in zip(blocks, held["opts"], strict=True):
                    torch.nn.utils.clip_grad_norm_(p, cfg["grad-clip"])
                    o.step()
                losses.append(loss.item())
        new = initial_arrays_of(model, s)
        return new, {
            "loss": float(np.mean(losses)),
            "num-examples": len(losses) * cfg["batch-size"],
        }

    return fit


def initial_arrays_of(model, s: SplitLlama) -> ArrayRecord:
    layers = [*s.a_layers, *s.b_layers, *s.c_layers]
    return ArrayRecord({k: v.cpu() for k, v in block_lora(model, layers).items()})
