"""Method tables, config fragments and the rules every app follows (same keys, pyproject
defaults = schema defaults, no method string compared outside a method table)."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from flowerbed.common import config as C
from flowerbed.common.methods import Method, MethodTable
from flowerbed.common.testing import REPO

APPS = sorted(p.parent.name for p in (REPO / "apps").glob("*/pyproject.toml"))
SHARED_KEYS = ("num-server-rounds", "partitioner", "method", "device", "seed")


def test_method_table_resolves_once_and_names_bad_values():
    table = MethodTable(
        Method("paper", "paper", "the method", flags={"calibrate": True}),
        Method("paper-nocal", "ablation", "without calibration", flags={"calibrate": False}),
    )
    schema = {**C.compose(C.RESULTS), "method": table.option()}
    cfg = C.parse({"method": "paper-nocal"}, schema, methods=table)
    assert cfg["method"] == "paper-nocal" and cfg.method is table["paper-nocal"]
    assert cfg.method.flag("calibrate") is False and cfg.method.flag("absent", 3) == 3
    assert C.parse({}, schema, methods=table).method.name == "paper"
    with pytest.raises(C.ConfigError, match=r"method='magic': must be one of paper, paper-nocal"):
        C.parse({"method": "magic"}, schema, methods=table)
    with pytest.raises(ValueError, match="duplicate method 'paper'"):
        MethodTable(table["paper"], table["paper"])
    with pytest.raises(ValueError, match="kind 'novel'"):
        Method("x", "novel", "")
    assert "| `paper-nocal` | ablation | without calibration |" in table.markdown()


def test_compose_sets_defaults_and_refuses_unknown_ones():
    schema = C.compose(C.SCHEDULE, C.DEVICE, num_server_rounds=7)
    assert (
        schema["num-server-rounds"].default == 7 and C.SCHEDULE["num-server-rounds"].default == 10
    )
    with pytest.raises(KeyError, match="no option 'num-rounds'"):
        C.compose(C.SCHEDULE, num_rounds=3)


def test_unknown_key_lists_the_valid_keys():
    schema = C.compose(C.DEVICE, C.RESULTS)
    with pytest.raises(C.ConfigError) as e:
        C.parse({"sed": 1}, schema)
    assert str(e.value) == ("unknown run config key 'sed'; valid keys: device, results-dir, seed")
    assert "\n" not in str(e.value)


def test_check_pyproject_names_each_disagreement(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        "[tool.flwr.app.config]\nseed = 42\nresults-dir = 'x'\nextra = 1\n"
    )
    problems = C.check_pyproject(tmp_path, C.compose(C.RESULTS, C.DEVICE))
    assert problems == [
        "device: in the schema, missing from pyproject.toml",
        "extra: in pyproject.toml, not in the schema",
        "results-dir: pyproject.toml has 'x', the schema ''",
    ]


def _task_module(app: str):
    path = REPO / "apps" / app
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    pkg = next(p.parent.name for p in path.glob("*/task.py"))
    return importlib.import_module(f"{pkg}.task"), pkg


@pytest.mark.parametrize("app", APPS)
def test_every_app_has_the_shared_keys_and_agrees_with_its_pyproject(app):
    task, _ = _task_module(app)
    assert set(SHARED_KEYS) <= set(task.SCHEMA), sorted(set(SHARED_KEYS) - set(task.SCHEMA))
    assert C.check_pyproject(REPO / "apps" / app, task.SCHEMA) == []
    assert task.SCHEMA["device"].choices == C.DEVICES
    cfg = task.parse_config({"num-server-rounds": 1})
    assert cfg["num-server-rounds"] == 1 and cfg.method is not None


# a method name compared in code: cfg["method"] == ..., method in (...), .startswith on it
_METHOD_COMPARE = re.compile(
    r"""\[["']method["']\]\s*(==|!=|\bin\b|\bnot in\b)|\[["']method["']\]\.startswith"""
    r"""|\.method\.name\s*(==|!=|\bin\b)"""
)


@pytest.mark.parametrize("app", APPS)
def test_no_method_string_is_compared_outside_the_method_table(app):
    _, pkg = _task_module(app)
    offenders = []
    for f in sorted((REPO / "apps" / app / pkg).glob("*.py")):
        if f.name == "methods.py":
            continue
        for i, line in enumerate(Path(f).read_text().splitlines(), 1):
            if _METHOD_COMPARE.search(line):
                offenders.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == []
