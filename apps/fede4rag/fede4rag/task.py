"""FedE4RAG app: run-config schema, the encoder's frozen features, the client step (InfoNCE +
logit distillation from the frozen global model), the retrieval evaluation and the
centralized baseline's fit."""

from __future__ import annotations

import copy
import shutil
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fede4rag.data import client_pairs, load_pairs
from fede4rag.model import (
    MODELS,
    Encoder,
    cosine_matrix,
    fede4rag_loss,
    load_encoder,
    retrieval_metrics,
)
from flowerbed.common import config as C
from flowerbed.common.client import LOCAL_ONLY, partition_of
from flowerbed.common.records import config_get, reply
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.train import get_device

SCHEMA: dict[str, C.Option] = C.compose(
    C.SCHEDULE,
    {
        "partitioner": C.DATA["partitioner"],
        "checkpoint": C.FAULTS["checkpoint"],
        "resume": C.FAULTS["resume"],
    },
    C.DEVICE,
    C.RESULTS,
    {
        "method": C.Option("fede4rag"),  # choices from the method table
        "model": C.Option("minilm", choices=MODELS, help="tiny (tests) | minilm"),
        "train-layers": C.Option(1, C.non_negative, "top layers trained (0 = whole encoder)"),
        "max-docs": C.Option(0, C.non_negative, "summaries used (0 = all 10,033)"),
        "query-len": C.Option(32, C.positive, "tokens per query > 0"),
        "passage-len": C.Option(64, C.positive, "tokens per passage > 0"),
        "batch-size": C.Option(8, C.positive, "pairs per step (in-batch negatives) > 1"),
        "lr": C.Option(1e-5, C.positive, "learning rate > 0"),
        "optimizer": C.Option("sgd", choices=("sgd", "adamw"), help="sgd | adamw"),
        "local-steps": C.Option(0, C.non_negative, "steps per round (0 = one local epoch)"),
        "lambda": C.Option(100.0, C.non_negative, "distillation weight >= 0 (fede4rag rows)"),
        "temperature": C.Option(1.0, C.positive, "InfoNCE temperature > 0"),
        "he": C.Option(False, help="CKKS-encrypted aggregation (TenSEAL)"),
        "he-poly-degree": C.Option(8192, C.positive, "CKKS polynomial modulus degree"),
        "he-audit-dir": C.Option(
            "",
            help="simulation diagnostic (he = true): folder shared by the clients for "
            "max |CKKS mean - plain mean| (he_audit_error); '' = off",
        ),
    },
    num_server_rounds=25,
    partitioner="topic-groups",
)

STUDENT = "fede4rag-student"


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one line naming a bad key or value) and resolve ``method``."""
    from fede4rag.methods import METHODS

    cfg = C.parse(run_config, {**SCHEMA, "method": METHODS.option("fede4rag")}, methods=METHODS)
    if cfg["batch-size"] < 2:
        raise C.ConfigError(
            f"run config batch-size={cfg['batch-size']}: in-batch InfoNCE needs > 1"
        )
    for key in ("checkpoint", "resume"):
        if cfg[key] and cfg["he"]:
            raise C.ConfigError(
                f"run config {key}=true: not with he=true (the server holds only the encrypted sum)"
            )
    if cfg["he-audit-dir"] and not cfg["he"]:
        raise C.ConfigError("run config he-audit-dir set: needs he=true (it audits the CKKS sum)")
    return cfg


# ---------------------------------------------------------------------------- model and features
@lru_cache(maxsize=2)
def _base(model: str, seed: int):
    return load_encoder(model, seed)


def make_encoder(cfg) -> Encoder:
    """A fresh copy of the pretrained (or seeded tiny) encoder, split at ``train-layers``."""
    bert, _ = _base(cfg["model"], cfg["seed"])
    return Encoder(copy.deepcopy(bert), int(cfg["train-layers"]))


def _feature_key(cfg) -> tuple:
    return (
        cfg["model"],
        cfg["seed"] if cfg["model"] == "tiny" else 0,
        int(cfg["train-layers"]),
        int(cfg["max-docs"]),
        int(cfg["query-len"]),
        int(cfg["passage-len"]),
    )


def feature_path(cfg):
    """Cache file of the frozen features (``$FLOWERBED_CACHE/fede4rag/``)."""
    from flowerbed.common.data import cache_dir

    tag = "-".join(str(k) for k in _feature_key(cfg))
    return cache_dir() / "fede4rag" / f"features-{tag}.pt"


def compute_features(cfg, progress: bool = False) -> dict[str, torch.Tensor]:
    """Tokenise every query and passage and run the frozen part of the encoder once."""
    pairs = load_pairs(int(cfg["max-docs"]))
    bert, tok = _base(cfg["model"], cfg["seed"])
    enc = Encoder(bert, int(cfg["train-layers"]))
    out: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for name, texts, length in (
        ("q", pairs.queries, cfg["query-len"]),
        ("p", pairs.passages, cfg["passage-len"]),
    ):
        ids, mask = tok(texts, int(length))
        chunks = []
        for s in range(0, len(texts), 128):
            chunks.append(enc.frozen(ids[s : s + 128], mask[s : s + 128]))
            if progress and (s // 128) % 10 == 0:
                print(
                    f"[fede4rag] features {name}: {s + len(chunks[-1])}/{len(texts)} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        feats = torch.cat(chunks)
        out[name] = feats.half() if feats.is_floating_point() else feats
        out[name + "-mask"] = mask
    return out


@lru_cache(maxsize=2)
def _features(key: tuple, cfg_items: tuple) -> dict[str, torch.Tensor]:
    cfg = dict(cfg_items)
    if cfg["model"] == "tiny":
        return compute_features(cfg)
    path = feature_path(cfg)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        feats = compute_features(cfg, progress=True)
        tmp = path.with_suffix(f".tmp{time.time_ns()}")
        torch.save(feats, tmp)
        tmp.replace(path)
    return torch.load(path, mmap=True)


def features(cfg) -> dict[str, torch.Tensor]:
    """The frozen features of every query (``q``) and passage (``p``), with their masks."""
    keys = ("model", "seed", "train-layers", "max-docs", "query-len", "passage-len")
    return _features(_feature_key(cfg), tuple((k, cfg[k]) for k in keys))


def initial_arrays(cfg) -> ArrayRecord:
    """The trained subset of the pretrained encoder."""
    return make_encoder(cfg).to_record()


# ---------------------------------------------------------------------------- the client step
def local_steps(cfg) -> int:
    return int(cfg["local-steps"])


def train_steps(
    cfg, student: Encoder, teacher: Encoder | None, index: np.ndarray, seed: int, steps: int
) -> dict[str, float]:
    """``steps`` optimiser steps of the FedE4RAG loss on the pairs ``index`` (batches drawn from
    a permutation seeded by ``seed``; ``steps = 0``: one epoch). ``teacher`` None: no
    distillation term."""
    feats = features(cfg)
    device = get_device(cfg["device"])
    student.bert.to(device)
    if teacher is not None:
        teacher.bert.to(device)
    bs = int(cfg["batch-size"])
    rng = np.random.default_rng(seed)
    per_epoch = max(len(index) // bs, 1)
    steps = steps or per_epoch
    order = np.concatenate([rng.permutation(index) for _ in range(-(-steps // per_epoch))])
    params = list(student.trained_modules().parameters())
    opt = (
        torch.optim.AdamW(params, lr=cfg["lr"])
        if cfg["optimizer"] == "adamw"
        else torch.optim.SGD(params, lr=cfg["lr"])
    )
    set_seed(seed)
    sums = {"loss": 0.0, "infonce": 0.0, "distill": 0.0}
    for s in range(steps):
        b = torch.as_tensor(order[s * bs : (s + 1) * bs])
        if len(b) < 2:
            b = torch.as_tensor(order[:bs])
        q, qm = feats["q"][b].to(device), feats["q-mask"][b].to(device)
        p, pm = feats["p"][b].to(device), feats["p-mask"][b].to(device)
        s_student = cosine_matrix(student.embed(q, qm), student.embed(p, pm))
        s_teacher = None
        if teacher is not None:
            with torch.no_grad():
                s_teacher = cosine_matrix(teacher.embed(q, qm), teacher.embed(p, pm))
        loss, parts = fede4rag_loss(s_student, s_teacher, cfg["lambda"], cfg["temperature"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sums["loss"] += float(loss)
        for k, v in parts.items():
            sums[k] += v
    student.bert.cpu()
    return {k: v / steps for k, v in sums.items()}


def received_global(msg: Message, cfg) -> tuple[ArrayRecord, np.ndarray | None]:
    """The global model of the message: plaintext ``arrays`` (vector None), or the CKKS sum
    ``enc`` decrypted with the clients' key and divided by the number of summands (with that
    mean as one float64 vector, before the cast to the model's dtype)."""
    if "enc" in msg.content.array_records:
        from flowerbed.strategies.fede4rag import client_context, decrypt_sum_mean, unflatten

        ctx = client_context(cfg["seed"], cfg["he-poly-degree"])
        vec = decrypt_sum_mean(ctx, msg.content["enc"], msg.content["config"])
        return unflatten(vec, make_encoder(cfg).to_record()), vec
    return msg.content["arrays"], None


def received_arrays(msg: Message, cfg) -> ArrayRecord:
    """The global model of the message (:func:`received_global` without the vector)."""
    return received_global(msg, cfg)[0]


# ---------------------------------------------------------------------------- the HE audit
def audit_file(cfg, server_round: int, node_id: int) -> Path:
    """Where node ``node_id`` leaves its plaintext update of ``server_round`` for the audit."""
    return Path(cfg["he-audit-dir"]) / f"r{int(server_round)}" / f"node{int(node_id)}.npy"


def write_audit(cfg, server_round: int, node_id: int, update: ArrayRecord) -> None:
    """Simulation diagnostic (``he-audit-dir``): the client's plaintext update, as the float64
    vector it encrypted, into the folder the clients share (never through the server)."""
    from flowerbed.strategies.fede4rag import flatten

    path = audit_file(cfg, server_round, node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, flatten(update))


def he_audit_error(cfg, conf, vec: np.ndarray) -> float:
    """The evaluator's audit: ``max_i |vec_i - (1/K) sum_k x_k,i|`` of the decrypted CKKS mean
    ``vec`` against the plain mean of the updates ``x_k`` of the nodes the sum holds
    (``he-nodes`` of the evaluate config); the round's files are removed afterwards."""
    rnd, nodes = int(conf["server-round"]), [int(n) for n in conf["he-nodes"]]
    total = np.zeros_like(vec)
    for n in nodes:
        total += np.load(audit_file(cfg, rnd, n))
    err = float(np.max(np.abs(vec - total / len(nodes))))
    shutil.rmtree(audit_file(cfg, rnd, 0).parent, ignore_errors=True)
    return err


def client_train(msg: Message, context, cfg) -> Message:
    """One round of a client: the student starts from the received global model, or (flag
    ``persistent``, or a local-only run) from this node's own model kept in
    ``context.state``; with flag ``distill`` the frozen global model is the teacher of the
    ``lambda`` term. The reply carries the student's trained subset, CKKS-encrypted when the
    train config says ``he`` (:class:`~flowerbed.strategies.fede4rag.EncryptedMean`)."""
    pid, num = partition_of(context)
    conf = msg.content.config_records.get("config")
    rnd = int(config_get(conf, "server-round", 0))
    local = bool(config_get(conf, LOCAL_ONLY, False))
    t0 = time.perf_counter()
    received = received_arrays(msg, cfg)
    t_dec = time.perf_counter() - t0
    keep = local or cfg.method.flag("persistent", False)
    start = context.state[STUDENT] if keep and STUDENT in context.state.array_records else received
    student = make_encoder(cfg).load(start)
    teacher = None
    if cfg.method.flag("distill", False) and cfg["lambda"] > 0:
        teacher = make_encoder(cfg).load(received)
    pairs = load_pairs(int(cfg["max-docs"]))
    index = client_pairs(pairs, pid, num, cfg["partitioner"], cfg["seed"])
    t1 = time.perf_counter()
    stats = train_steps(
        cfg, student, teacher, index, derive_seed(cfg["seed"], pid, rnd), local_steps(cfg)
    )
    stats["train-time-s"] = time.perf_counter() - t1
    new = student.to_record()
    if keep:
        context.state[STUDENT] = new
    metrics = {**stats, "num-examples": len(index), "unit-weight": 1}
    if config_get(conf, "he", False):  # the server's EncryptedMean asks for ciphertexts
        from flowerbed.strategies.fede4rag import client_context, encrypt_arrays

        t2 = time.perf_counter()
        enc = encrypt_arrays(client_context(cfg["seed"], cfg["he-poly-degree"]), new)
        if cfg["he-audit-dir"]:
            write_audit(cfg, rnd, context.node_id, new)
        metrics["he-encrypt-s"] = time.perf_counter() - t2
        metrics["he-decrypt-s"] = t_dec
        content = reply(None, **metrics)
        content["enc"] = enc
        return Message(content=content, reply_to=msg)
    return Message(content=reply(new, **metrics), reply_to=msg)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed_index(cfg, enc: Encoder, name: str, index: np.ndarray) -> torch.Tensor:
    """Embeddings of the queries (``name = "q"``) or passages (``"p"``) ``index`` from the cached
    frozen features, on the run's device, in chunks of 256 (returned on the CPU)."""
    feats, device = features(cfg), get_device(cfg["device"])
    enc.bert.to(device)
    out = []
    for s in range(0, len(index), 256):
        b = torch.as_tensor(index[s : s + 256])
        out.append(enc.embed(feats[name][b].to(device), feats[name + "-mask"][b].to(device)))
    enc.bert.cpu()
    return torch.cat(out).cpu()


def drift(arrays: ArrayRecord, start: np.ndarray) -> float:
    """``||theta - theta_0|| / ||theta_0||`` of the trained subset against the pretrained one."""
    from flowerbed.strategies.fede4rag import flatten

    return float(np.linalg.norm(flatten(arrays) - start) / np.linalg.norm(start))


def evaluator(cfg):
    """``evaluate(arrays) -> {hit@1, hit@5, hit@10, mrr, ndcg@10, drift}``: the held-out
    questions against the whole passage pool (plain matrix index), and how far the trained
    subset moved from the pretrained encoder (:func:`drift`)."""
    from flowerbed.strategies.fede4rag import flatten

    pairs = load_pairs(int(cfg["max-docs"]))
    test = pairs.test_index
    start = flatten(initial_arrays(cfg))

    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        enc = make_encoder(cfg).load(arrays)
        q = embed_index(cfg, enc, "q", test)
        p = embed_index(cfg, enc, "p", np.arange(len(pairs)))
        return {**retrieval_metrics(q, p, test), "drift": drift(arrays, start)}

    return evaluate


def central_fit(cfg, num_partitions: int):
    """``fit(round, arrays)`` of the centralized baseline: InfoNCE on the pooled training pairs
    of all clients, ``num_partitions`` times the clients' steps per round (the same number of
    examples as a federated round), seeded by (seed, round)."""

    def fit(server_round: int, arrays: ArrayRecord):
        pairs = load_pairs(int(cfg["max-docs"]))
        index = np.concatenate(
            [
                client_pairs(pairs, k, num_partitions, cfg["partitioner"], cfg["seed"])
                for k in range(num_partitions)
            ]
        )
        student = make_encoder(cfg).load(arrays)
        steps = local_steps(cfg) * num_partitions
        stats = train_steps(
            cfg, student, None, np.sort(index), derive_seed(cfg["seed"], 0xCE, server_round), steps
        )
        return student.to_record(), stats

    return fit
