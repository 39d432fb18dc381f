"""``get_device``: auto / cpu / cuda, and the warning when CUDA is asked for but absent."""

from __future__ import annotations

from logging import WARNING

import torch

from flowerbed.common import train


def test_get_device_choices_and_the_no_cuda_warning(monkeypatch):
    logged = []
    monkeypatch.setattr(train, "log", lambda level, msg: logged.append((level, msg)))
    train._warn_no_cuda.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.get_device("auto") == torch.device("cpu")
    assert logged == []  # auto on a CPU node is the normal case: no warning
    assert train.get_device("cuda") == torch.device("cpu")
    assert train.get_device("cuda") == torch.device("cpu")
    assert len(logged) == 1 and logged[0][0] == WARNING and "no CUDA" in logged[0][1]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.get_device("auto") == torch.device("cuda")
    assert train.get_device("cuda") == torch.device("cuda")
    assert train.get_device("cpu") == torch.device("cpu")
    train._warn_no_cuda.cache_clear()
