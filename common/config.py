"""Typed, validated run configs, composed from shared fragments.

Each app declares a schema ``{key: Option(default, check, help)}`` built with :func:`compose`
from the shared fragments below (:data:`SCHEDULE`, :data:`DATA`, :data:`TRAIN`, :data:`DEVICE`,
:data:`RESULTS`, :data:`FAULTS`, :data:`ATTACK`,
:data:`PARTICIPATION`) plus its own options, so the same key means the same thing in
every app. :func:`parse` checks a run config (``context.run_config`` or the runner's overrides)
against it and raises :class:`ConfigError` with a one-line message naming the bad key and value
before any work starts. With a :class:`~flowerbed.common.methods.MethodTable` it also resolves the
``method`` key once: the returned :class:`RunConfig` carries the :class:`Method` as
``cfg.method``.

:func:`check_pyproject` compares an app's ``[tool.flwr.app.config]`` with its schema (same keys,
same defaults); every app's tests call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowerbed.common.methods import Method, MethodTable


class ConfigError(ValueError):
    """A run config value that is malformed, of the wrong type or out of range."""


@dataclass(frozen=True)
class Option:
    """One run-config option.

    Parameters
    ----------
    default : bool, int, float or str
        Default value; its type is the option's type (ints are accepted for floats).
    check : callable or None, default None
        ``check(value) -> bool``; False makes :func:`parse` fail.
    help : str, default ""
        One line for the docs and for the error message (what a valid value is).
    choices : tuple or None, default None
        Allowed values, if the option is an enumeration.
    """

    default: Any
    check: Callable[[Any], bool] | None = None
    help: str = ""
    choices: tuple | None = None


def positive(v) -> bool:
    return v > 0


def non_negative(v) -> bool:
    return v >= 0


def unit_interval(v) -> bool:
    return 0.0 <= v <= 1.0


def _cast(key: str, value: Any, default: Any) -> Any:
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run config {key}={value!r}: expected true or false")
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
            raise ConfigError(f"run config {key}={value!r}: expected an integer")
        return value
    if want is float:
        if isinstance(value, bool):
            raise ConfigError(f"run config {key}={value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"run config {key}={value!r}: expected a number") from None
    if want is str:
        if not isinstance(value, str):
            raise ConfigError(f"run config {key}={value!r}: expected a string")
        return value
    return value


class RunConfig(dict):
    """A parsed run config: ``{key: typed value}`` plus the resolved ``method``.

    ``cfg["method"]`` stays the string of the run config (it is what ``results.json`` records);
    ``cfg.method`` is the :class:`~flowerbed.common.methods.Method` it names (None when the schema
    has no method table).
    """

    method: Method | None = None


def parse(
    run_config: Mapping[str, Any],
    schema: Mapping[str, Option],
    allow_unknown: bool = False,
    methods: MethodTable | None = None,
) -> RunConfig:
    """Validate ``run_config`` against ``schema``; return every option with its typed value.

    Parameters
    ----------
    run_config : mapping
        The run config (``context.run_config``, or the runner's overrides fused with the app's
        defaults).
    schema : mapping of str to Option
        The app's schema (see :func:`compose`).
    allow_unknown : bool, default False
        Ignore keys that are not in ``schema``.
    methods : MethodTable or None, default None
        The app's method table; ``cfg.method`` is then the resolved method.

    Raises
    ------
    ConfigError
        Unknown key (unless ``allow_unknown``), wrong type, a value outside ``choices`` or one
        that fails its ``check``. The message names the key and the value.
    """
    if not allow_unknown:
        unknown = sorted(set(run_config) - set(schema))
        if unknown:
            raise ConfigError(
                f"unknown run config key {unknown[0]!r}; valid keys: {', '.join(sorted(schema))}"
            )
    out = RunConfig()
    for key, opt in schema.items():
        value = _cast(key, run_config.get(key, opt.default), opt.default)
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(
                f"run config {key}={value!r}: must be one of {', '.join(map(str, opt.choices))}"
            )
        if opt.check is not None and not opt.check(value):
            raise ConfigError(f"run config {key}={value!r}: {opt.help or 'invalid value'}")
        out[key] = value
    if methods is not None:
        out.method = methods.resolve(out["method"])
    return out


# ---------------------------------------------------------------------------- fragments
def compose(*fragments: Mapping[str, Option], **defaults: Any) -> dict[str, Option]:
    """One schema from ``fragments`` (later ones win), with app-specific ``defaults``.

    ``defaults`` use the key with ``-`` written as ``_`` (``num_server_rounds=20``); a default
    for a key no fragment declares is an error, so a typo cannot add a key silently.
    """
    schema: dict[str, Option] = {}
    for frag in fragments:
        schema.update(frag)
    for name, value in defaults.items():
        key = name.replace("_", "-")
        if key not in schema:
            raise KeyError(f"compose: no option {key!r} to set a default for")
        schema[key] = replace(schema[key], default=value)
    return schema


def _partitioner_known(name: str) -> bool:
    from flowerbed.common.partition import partitioners

    if name not in partitioners():
        raise ConfigError(
            f"run config partitioner={name!r}: must be one of {', '.join(partitioners())}"
        )
    return True


def _dataset_known(name: str) -> bool:
    from flowerbed.common.data import available

    if name not in available() and not name.startswith("ldl/"):
        raise ConfigError(
            f"run config dataset={name!r}: unknown dataset; known: {', '.join(available())}"
        )
    return True


def _id_list(v: str) -> bool:
    from flowerbed.common.faults import parse_ids

    try:
        parse_ids(v)
    except ValueError:
        return False
    return True


DEVICES = ("auto", "cpu", "cuda")
FAULT_MODES = ("none", "raise", "hang", "exit", "mixed")

#: The federated schedule: rounds, sampling, replies needed, how long to wait for them.
SCHEDULE: dict[str, Option] = {
    "num-server-rounds": Option(10, positive, "number of rounds, > 0"),
    "fraction-train": Option(1.0, lambda v: 0 < v <= 1, "fraction in (0, 1]"),
    "fraction-evaluate": Option(0.0, unit_interval, "fraction in [0, 1]"),
    "min-train-replies": Option(1, positive, "minimum valid replies > 0"),
    "round-timeout": Option(3600.0, positive, "seconds to wait for replies per round > 0"),
}

#: The data: a registered dataset and a registered partitioner with its options.
DATA: dict[str, Option] = {
    "dataset": Option("fashion_mnist", _dataset_known, "a dataset of flowerbed.common.data"),
    "data-dir": Option("", help="folder of the dataset files ('' = the source's default)"),
    "partitioner": Option("dirichlet", _partitioner_known, "a registered partitioner"),
    "alpha": Option(0.5, positive, "Dirichlet alpha > 0"),
    "classes-per-partition": Option(2, positive, "classes per client > 0"),
}

#: Local training of the clients.
TRAIN: dict[str, Option] = {
    "local-epochs": Option(1, positive, "local epochs > 0"),
    "batch-size": Option(32, positive, "batch size > 0"),
    "lr": Option(0.01, positive, "learning rate > 0"),
    "proximal-mu": Option(0.01, non_negative, "FedProx mu >= 0 (method fedprox)"),
}

#: Where the computation runs.
DEVICE: dict[str, Option] = {
    "device": Option("auto", choices=DEVICES, help="auto (cuda if available) | cpu | cuda"),
}

#: Reproducibility and output.
RESULTS: dict[str, Option] = {
    "seed": Option(42, help="run seed"),
    "results-dir": Option("", help="output folder ('' = outputs/<app>/<time>)"),
}

#: Fault injection (tests, soak) and checkpoint / resume; all off by default.
FAULTS: dict[str, Option] = {
    "fault-mode": Option("none", choices=FAULT_MODES, help="fault injection (tests, soak)"),
    "fault-rate": Option(0.0, unit_interval, "fraction of client calls failing in [0, 1]"),
    "fault-partitions": Option("", _id_list, "comma-separated partition ids"),
    "fault-rounds": Option("", _id_list, "comma-separated round numbers"),
    "fault-hang-s": Option(0.0, non_negative, "hang seconds >= 0 (0 = round-timeout + 5)"),
    "checkpoint": Option(False, help="write a checkpoint after every round"),
    "resume": Option(False, help="continue from the checkpoint in results-dir"),
}


#: Byzantine attacks (:mod:`flowerbed.common.attacks`); off by default. Any FedAvg-shaped app
#: composes it and wraps its strategy with :func:`flowerbed.common.attacks.with_attack`.
ATTACK: dict[str, Option] = {
    "attack": Option(
        "none",
        help="none | label-flip | sign-flip | gaussian | lie | min-max | min-sum | ipm",
        choices=("none", "label-flip", "sign-flip", "gaussian", "lie", "min-max", "min-sum", "ipm"),
    ),
    "attack-fraction": Option(0.0, lambda v: 0 <= v < 1, "malicious fraction in [0, 1)"),
    "attack-select": Option(
        "first", choices=("first", "last", "random"), help="which partitions: first | last | random"
    ),
    "attack-partitions": Option("", _id_list, "comma-separated malicious partition ids"),
    "attack-collude": Option(True, help="attackers see the benign updates of the round"),
    "attack-scale": Option(1.0, positive, "sign-flip scale, Gaussian std, IPM epsilon > 0"),
    "attack-direction": Option(
        "std", choices=("std", "unit"), help="min-max / min-sum direction: std | unit"
    ),
}


#: Participation-gap evaluation (:mod:`flowerbed.common.participation`, Yuan et al., ICLR 2022);
#: off by default (``unparticipating-fraction = 0``). An app composes it, wraps its strategy with
#: :func:`flowerbed.common.participation.with_participation` and answers the gap evaluation in
#: its ClientApp with :func:`flowerbed.common.participation.evaluate_splits`.
PARTICIPATION: dict[str, Option] = {
    "unparticipating-fraction": Option(
        0.0, lambda v: 0 <= v < 1, "fraction of clients that never train in [0, 1) (0 = off)"
    ),
    "val-fraction": Option(
        0.2, lambda v: 0 <= v < 1, "validation share of a participating client in [0, 1)"
    ),
    "gap-eval-every": Option(1, positive, "gap evaluation every n rounds > 0 (and the last)"),
}


#: The fragments of an app whose clients train a model on a partition (most apps): compose them
#: with ``C.compose(*C.STANDARD, {app options}, num_server_rounds=...)``.
STANDARD = (SCHEDULE, DATA, TRAIN, DEVICE, RESULTS)


def check_pyproject(app_dir: str | Path, schema: Mapping[str, Option]) -> list[str]:
    """Differences between an app's ``[tool.flwr.app.config]`` and its schema (empty: agree).

    Every schema key must be in the pyproject with the schema's default (ints and floats
    compare by value) and the pyproject must declare no other key.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    text = (Path(app_dir) / "pyproject.toml").read_text()
    declared = tomllib.loads(text)["tool"]["flwr"]["app"].get("config", {})
    problems = []
    for key in sorted(set(schema) | set(declared)):
        if key not in declared:
            problems.append(f"{key}: in the schema, missing from pyproject.toml")
        elif key not in schema:
            problems.append(f"{key}: in pyproject.toml, not in the schema")
        else:
            want, got = schema[key].default, declared[key]
            if type(want) is bool or type(got) is bool:
                same = want is got
            elif isinstance(want, int | float) and isinstance(got, int | float):
                same = float(want) == float(got)
            else:
                same = want == got
            if not same:
                problems.append(f"{key}: pyproject.toml has {got!r}, the schema {want!r}")
    return problems
