"""Runner pieces: resources, sweep tables, app lookup."""

import json
import logging

import pytest
import torch

from flowerbed.simulation.inprocess import app_dir, backend_config
from flowerbed.simulation.table import render


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_gpu_request_degrades_to_cpu_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="flowerbed"):
        cfg = backend_config(num_cpus=1, num_gpus=0.25)
    assert cfg["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert "no CUDA GPU is present" in caplog.text


def test_unknown_app_names_the_value():
    with pytest.raises(ValueError, match="unknown app 'fedzzz'"):
        app_dir("fedzzz")


def _fake_run(folder, alpha, seed, acc, curve):
    folder.mkdir(parents=True)
    rec = {
        "config": {"alpha": alpha, "seed": seed, "results-dir": str(folder)},
        "rounds": [{"round": r, "server_accuracy": a} for r, a in enumerate(curve)],
        "extra": {"final": {"accuracy": acc}},
    }
    (folder / "results.json").write_text(json.dumps(rec))


def test_sweep_table_mean_std_and_plot(tmp_path):
    _fake_run(tmp_path / "0", 0.1, 0, 0.70, [0.1, 0.5, 0.7])
    _fake_run(tmp_path / "1", 0.1, 1, 0.80, [0.1, 0.6, 0.8])
    _fake_run(tmp_path / "2", 1.0, 0, 0.90, [0.1, 0.8, 0.9])
    md = render(tmp_path)
    lines = md.splitlines()
    assert lines[0] == "| alpha | accuracy | seeds |"
    # mean 0.75, sample std 0.0707 over the two seeds of alpha=0.1
    assert lines[2] == "| 0.1 | 0.7500 ± 0.0707 | 2 |"
    assert lines[3] == "| 1.0 | 0.9000 ± 0.0000 | 1 |"
    assert (tmp_path / "summary.md").exists()
    assert (tmp_path / "server_accuracy.png").stat().st_size > 1000
