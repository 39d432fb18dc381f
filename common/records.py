"""Helpers between torch state and Flower records, and checks on received arrays."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn


def to_record(obj: nn.Module | dict[str, torch.Tensor]) -> ArrayRecord:
    """ArrayRecord of a model's ``state_dict`` (or of a state dict), tensors moved to CPU."""
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def load_record(model: nn.Module, record: ArrayRecord, strict: bool = True) -> nn.Module:
    """Load ``record`` into ``model`` (in place) and return the model."""
    model.load_state_dict(record.to_torch_state_dict(), strict=strict)
    return model


def wire_nbytes(content: RecordDict | None) -> int:
    """Bytes of ``content`` as it crosses the wire: the size of Flower's serialised RecordDict.

    This is THE byte count of flowerbed: every ``bytes_sent`` / ``bytes_received`` in a
    ``results.json`` (per phase, per round, per run) is a sum of it over the messages of that
    direction. It includes arrays, metrics and configs with their keys and protobuf framing; the
    per-message metadata (ids, type, ttl: about 100 bytes) is left out.
    """
    if content is None:
        return 0
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


def check_arrays(
    reply: ArrayRecord,
    reference: ArrayRecord | None,
    max_update_norm: float | None = None,
) -> str | None:
    """Why ``reply`` must not be aggregated, or ``None`` if it may.

    Checks, in order: the same keys as ``reference``, the same shapes and dtypes, only finite
    values, and (if ``max_update_norm`` is set) an L2 norm of ``reply - reference`` not above it.
    With ``reference=None`` only finiteness (and no norm) is checked.
    """
    if reference is not None:
        missing = sorted(set(reference.keys()) - set(reply.keys()))
        extra = sorted(set(reply.keys()) - set(reference.keys()))
        if missing or extra:
            return f"keys differ from the global model (missing {missing[:3]}, extra {extra[:3]})"
    sq = 0.0
    for key, arr in reply.items():
        if reference is not None:
            ref = reference[key]
            if tuple(arr.shape) != tuple(ref.shape):
                return f"array {key!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
            if arr.dtype != ref.dtype:
                return f"array {key!r} has dtype {arr.dtype}, expected {ref.dtype}"
        a = arr.numpy()
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = "NaN" if np.isnan(a).any() else "Inf"
            return f"array {key!r} contains {bad}"
        if reference is not None and max_update_norm is not None and a.dtype.kind in "fc":
            sq += float(np.sum((a.astype(np.float64) - reference[key].numpy()) ** 2))
    if reference is not None and max_update_norm is not None:
        norm = sq**0.5
        if norm > max_update_norm:
            return f"update norm {norm:.4g} exceeds max_update_norm={max_update_norm:.4g}"
    return None


def reply(arrays: ArrayRecord | None = None, **metrics: float | int) -> RecordDict:
    """RecordDict for a ClientApp reply: ``arrays`` (optional) and ``metrics``."""
    content = RecordDict({"metrics": MetricRecord(dict(metrics))})
    if arrays is not None:
        content["arrays"] = arrays
    return content


def config_get(config: ConfigRecord | None, key: str, default):
    """``config[key]`` cast to the type of ``default``; ``default`` if absent."""
    if config is None or key not in config:
        return default
    return type(default)(config[key])
