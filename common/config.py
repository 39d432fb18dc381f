"""Typed, validated run configs.

Each app declares a schema ``{key: Option(default, check, help)}``. :func:`parse` checks a run
config (``context.run_config`` or the runner's overrides) against it and raises
:class:`ConfigError` with a one-line message naming the bad key and value before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


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


def parse(
    run_config: Mapping[str, Any],
    schema: Mapping[str, Option],
    allow_unknown: bool = False,
) -> dict[str, Any]:
    """Validate ``run_config`` against ``schema``; return every option with its typed value.

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
                f"unknown run config key {unknown[0]!r}; known: {', '.join(sorted(schema))}"
            )
    out = {}
    for key, opt in schema.items():
        value = _cast(key, run_config.get(key, opt.default), opt.default)
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(
                f"run config {key}={value!r}: must be one of {', '.join(map(str, opt.choices))}"
            )
        if opt.check is not None and not opt.check(value):
            raise ConfigError(f"run config {key}={value!r}: {opt.help or 'invalid value'}")
        out[key] = value
    return out
