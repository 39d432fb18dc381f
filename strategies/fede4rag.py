"""FedE4RAG's server side: the mean of the client models, in plaintext or under CKKS.

Paper: Q. Mao et al., "Privacy-Preserving Federated Embedding Learning for Localized
Retrieval-Augmented Generation" (FedE4RAG), arXiv:2504.19101, 2025.

- **Plaintext** (:func:`make_plain_mean`, From the authors' code): the unweighted mean of the
  client models, ``theta_g = (1/K) sum_k theta_k``: Flower's FedAvg (flowerbed's guarded
  subclass) weighted by the reply metric ``unit-weight`` (1 for every client).
- **Homomorphic** (:class:`EncryptedMean`, Reconstruction: the paper encrypts the uploads, the
  released code has no HE): the clients encrypt their trained parameters with CKKS (TenSEAL),
  the server adds the ciphertexts under a *public* context (no secret key) and sends the sum
  back; the clients decrypt it and divide by ``K``. The server never holds a plaintext update
  or the plaintext global model; the retrieval metrics of the global model are computed by one
  client (the evaluator) and only the metrics come back.

Keys (simulation shortcut): the clients share one CKKS secret key, created by the first client
that needs it under a file lock in ``$FLOWERBED_CACHE/fede4rag/he/`` (keyed by the run seed) and
read by the others from there; in a deployment the clients would agree on it out of band (it
never passes through the server). The server gets the public context in a setup phase.
"""

from __future__ import annotations

import fcntl
import math
import time
from functools import lru_cache
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log

from flowerbed.common.protocol import PhasedStrategy, Protocol, RoundOutcome, wait_for_nodes
from flowerbed.strategies.baselines import guard_kwargs
from flowerbed.strategies.fedavg import FedAvg

SETUP = "train.hesetup"
#: CKKS parameters (TenSEAL's tutorial setting: 4096 slots, ~40-bit precision, 128-bit security)
COEFF_MOD_BITS = (60, 40, 40, 60)
SCALE = 2.0**40


class HEError(RuntimeError):
    """A ciphertext, a context or a key does not fit the protocol."""


# ---------------------------------------------------------------------------- plaintext mean
def make_plain_mean(cfg, **_: Any) -> FedAvg:
    """The authors' server: the unweighted mean of the client models (FedAvg, equal weights)."""
    return FedAvg(**{**guard_kwargs(cfg), "weighted_by_key": "unit-weight"})


# ---------------------------------------------------------------------------- CKKS codec
def new_context(poly_degree: int = 8192):
    """A CKKS context with a fresh secret key."""
    import tenseal as ts

    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, int(poly_degree), coeff_mod_bit_sizes=list(COEFF_MOD_BITS)
    )
    ctx.global_scale = SCALE
    return ctx


@lru_cache(maxsize=4)
def client_context(seed: int, poly_degree: int = 8192):
    """The clients' shared secret context (simulation shortcut, module docstring)."""
    import tenseal as ts

    from flowerbed.common.data import cache_dir

    folder = cache_dir() / "fede4rag" / "he"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"key-{int(seed)}-{int(poly_degree)}.ctx"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(new_context(poly_degree).serialize(save_secret_key=True))
            tmp.replace(path)
        data = path.read_bytes()
    return ts.context_from(data)


def public_bytes(ctx) -> bytes:
    """The context without its secret key (what the server may hold)."""
    return ctx.serialize(save_secret_key=False)


def flatten(arrays: ArrayRecord) -> np.ndarray:
    """Every array of ``arrays`` in key order, as one float64 vector."""
    return np.concatenate([np.asarray(arrays[k].numpy(), dtype=np.float64).ravel() for k in arrays])


def _bytes_array(data: bytes) -> Array:
    return Array(np.frombuffer(data, dtype=np.uint8).copy())


def encrypt_arrays(ctx, arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` flattened and encrypted: ``{"ciphertext": uint8 bytes of a CKKSVector}``."""
    import tenseal as ts

    vec = ts.ckks_vector(ctx, flatten(arrays).tolist())
    return ArrayRecord({"ciphertext": _bytes_array(vec.serialize())})


def load_ciphertext(ctx, record: ArrayRecord):
    """The CKKSVector of an ``enc`` record under ``ctx`` (public or secret)."""
    import tenseal as ts

    if list(record.keys()) != ["ciphertext"]:
        raise HEError(f"expected one array 'ciphertext', got {sorted(record.keys())}")
    arr = record["ciphertext"].numpy()
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise HEError(f"ciphertext must be 1-D uint8, got {arr.dtype} {arr.shape}")
    try:
        return ts.ckks_vector_from(ctx, arr.tobytes())
    except Exception as e:  # TenSEAL raises plain ValueError/RuntimeError on bad bytes
        raise HEError(f"ciphertext does not deserialize ({type(e).__name__})") from None


def add_ciphertexts(public_ctx, records: list[ArrayRecord]) -> ArrayRecord:
    """Sum of encrypted vectors, computed with the public context only."""
    total = load_ciphertext(public_ctx, records[0])
    for r in records[1:]:
        total = total + load_ciphertext(public_ctx, r)
    return ArrayRecord({"ciphertext": _bytes_array(total.serialize())})


def decrypt_sum_mean(ctx, record: ArrayRecord, config: ConfigRecord) -> np.ndarray:
    """Client side: the decrypted sum divided by ``he-count``, as one float64 vector."""
    count = int(config.get("he-count", 0))
    if count < 1:
        raise HEError(f"he-count={count}: the number of summands must be >= 1")
    return np.asarray(load_ciphertext(ctx, record).decrypt(), dtype=np.float64) / count


def unflatten(vec: np.ndarray, template: ArrayRecord) -> ArrayRecord:
    """``vec`` cut and reshaped like ``template`` (its key order and dtypes)."""
    out, pos = {}, 0
    for k in template:
        ref = template[k].numpy()
        out[k] = Array(vec[pos : pos + ref.size].reshape(ref.shape).astype(ref.dtype))
        pos += ref.size
    if pos != len(vec):
        raise HEError(f"decrypted {len(vec)} values, the trained subset has {pos}")
    return ArrayRecord(out)


def decrypt_mean(
    ctx, record: ArrayRecord, config: ConfigRecord, template: ArrayRecord
) -> ArrayRecord:
    """Client side: decrypt the sum, divide by ``he-count``, reshape like ``template``."""
    return unflatten(decrypt_sum_mean(ctx, record, config), template)


# ---------------------------------------------------------------------------- the strategy
class EncryptedMean(PhasedStrategy):
    """The mean of the client models under CKKS: the server adds ciphertexts only.

    Round ``t``: phase ``train`` sends the encrypted sum of round ``t-1`` (``enc``) with
    ``he-count`` (the first round: the public pretrained ``arrays``); each client decrypts,
    trains and answers with its encrypted trained parameters; the server checks every reply
    (named reasons), adds the valid ones and keeps the sum; phase ``evaluate`` sends the sum to
    the evaluator client (lowest node id), which answers with the retrieval metrics only.

    Parameters
    ----------
    num_values : int
        Number of trained parameters (the length every ciphertext must decrypt to).
    min_nodes : int, default 1
        Nodes that must be connected before a round starts.
    min_replies : int, default 1
        Valid replies needed to replace the sum; with fewer, the previous sum is kept.
    evaluate : bool, default True
        Run the evaluator phase after every round.
    """

    def __init__(
        self, num_values: int, min_nodes: int = 1, min_replies: int = 1, evaluate: bool = True
    ) -> None:
        self.num_values = int(num_values)
        self.min_nodes = min_nodes
        self.min_replies = min_replies
        self.evaluate = evaluate
        self.public = None  # TenSEAL context without secret key
        self.encrypted_sum: ArrayRecord | None = None
        self.count = 0
        self.history: dict[int, dict] = {}

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> EncryptedMean: CKKS (TenSEAL), the server adds ciphertexts only")
        log(INFO, "\t├──> values per update: %d", self.num_values)
        log(INFO, "\t└──> min_replies: %d", self.min_replies)

    # ------------------------------------------------------------------ validation
    def check_setup(self, msg: Message) -> str | None:
        """Why a setup reply's public context is refused, or None."""
        import tenseal as ts

        conf = msg.content.config_records.get("he")
        if conf is None or not isinstance(conf.get("public-context"), bytes):
            return "no ConfigRecord 'he' with bytes 'public-context'"
        try:
            ctx = ts.context_from(conf["public-context"])
        except Exception:
            return "public context does not deserialize"
        if ctx.is_private():
            return "the context carries the secret key"
        return None

    def check_update(self, msg: Message) -> str | None:
        """Why an encrypted update is refused (missing, plaintext, malformed, wrong size)."""
        content = msg.content
        if set(content.array_records) != {"enc"}:
            return f"expected only ArrayRecord 'enc', got {sorted(content.array_records)}"
        metrics = list(content.metric_records.values())
        if len(metrics) != 1:
            return f"expected one MetricRecord, got {len(metrics)}"
        for k, v in metrics[0].items():
            if isinstance(v, float) and not math.isfinite(v):
                return f"metric {k!r} is not finite"
        try:
            vec = load_ciphertext(self.public, content["enc"])
        except HEError as e:
            return str(e)
        if vec.size() != self.num_values:
            return f"ciphertext holds {vec.size()} values, expected {self.num_values}"
        return None

    @staticmethod
    def check_metrics(msg: Message) -> str | None:
        metrics = list(msg.content.metric_records.values())
        if len(metrics) != 1 or "mrr" not in metrics[0]:
            return "expected one MetricRecord with the retrieval metrics"
        return None

    # ------------------------------------------------------------------ the round
    def setup(self, protocol: Protocol, nodes: list[int]) -> None:
        """Phase ``train.hesetup``: the clients answer with the public context."""
        rep = protocol.broadcast(
            SETUP,
            RecordDict({"config": ConfigRecord({})}),
            nodes,
            message_type=SETUP,
            validate=self.check_setup,
        )
        if not rep.replies:
            reasons = "; ".join(f"node {n}: {r}" for n, r in sorted(rep.failures.items()))
            raise HEError(f"no client sent a valid public context ({reasons[:500]})")
        import tenseal as ts

        first = min(rep.replies, key=lambda m: m.metadata.src_node_id)
        self.public = ts.context_from(first.content["he"]["public-context"])

    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """Setup (once), encrypted training, ciphertext sum, evaluator metrics."""
        nodes = wait_for_nodes(protocol.grid, self.min_nodes)
        if self.public is None:
            self.setup(protocol, nodes)
        train_config["server-round"] = server_round
        train_config["he"] = True  # the clients answer with ciphertexts
        if self.encrypted_sum is None:
            content = RecordDict({"arrays": arrays, "config": train_config})
        else:
            train_config["he-count"] = self.count
            content = RecordDict({"enc": self.encrypted_sum, "config": train_config})
        rep = protocol.broadcast("train", content, nodes, validate=self.check_update)
        hist = self.history.setdefault(server_round, {})
        hist["num_train_replies"] = len(rep.replies)
        hist["num_failures"] = len(rep.failures)
        if len(rep.replies) < max(self.min_replies, 1):
            log(
                INFO,
                "round %d: %d valid encrypted replies; sum kept",
                server_round,
                len(rep.replies),
            )
            return RoundOutcome()
        good = sorted(rep.replies, key=lambda m: m.metadata.src_node_id)
        t0 = time.perf_counter()
        self.encrypted_sum = add_ciphertexts(self.public, [m.content["enc"] for m in good])
        self.count = len(good)
        add_s = time.perf_counter() - t0
        keys = set.intersection(*(set(m.content["metrics"]) for m in good))
        train = {k: float(np.mean([m.content["metrics"][k] for m in good])) for k in sorted(keys)}
        train["he-add-s"] = add_s
        if not self.evaluate:
            return RoundOutcome(train_metrics=MetricRecord(train))
        # he-nodes: whose updates the sum holds (the evaluator's audit, task.he_audit_error)
        conf = ConfigRecord(
            {
                "server-round": server_round,
                "he-count": self.count,
                "he-nodes": [int(m.metadata.src_node_id) for m in good],
            }
        )
        ev = protocol.exchange(
            "evaluate",
            {
                min(m.metadata.src_node_id for m in good): RecordDict(
                    {"enc": self.encrypted_sum, "config": conf}
                )
            },
            message_type=MessageType.EVALUATE,
            validate=self.check_metrics,
        )
        server = MetricRecord(dict(ev.replies[0].content["metrics"])) if ev.replies else None
        return RoundOutcome(train_metrics=MetricRecord(train), server_metrics=server)
