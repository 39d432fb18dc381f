"""Method tables: what each value of the run-config key ``method`` is, in one place per app.

An app declares one :class:`MethodTable` of :class:`Method` entries: the paper's method, its
ablations and the baselines. Each entry names its strategy factory (server side), its client step
and its flags (the switches an ablation turns). The table is resolved once, when the run config
is parsed (:func:`flowerbed.common.config.parse` with ``methods=``): code then reads
``cfg.method.strategy``, ``cfg.method.client`` and ``cfg.method.flags`` and never compares method
strings. An ablation is one row of the table.

Shared baselines (FedAvg, FedProx, local-only, centralized) are rows built by
:mod:`flowerbed.strategies.baselines`, so every app runs them the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

KINDS = ("paper", "ablation", "baseline", "reconstruction")


@dataclass(frozen=True)
class Method:
    """One value of the run-config key ``method``.

    Parameters
    ----------
    name : str
        The value of ``method`` (``"fedqual"``, ``"fedqual-nocal"``, ``"fedavg"``...).
    kind : str
        ``"paper"`` (the paper's method), ``"ablation"``, ``"baseline"`` or ``"reconstruction"``
        (a method the paper does not define in full; the app's README says what was filled in).
    help : str
        One line for the README's method table and the ``--help`` of the runner.
    strategy : callable or None, default None
        Server side: ``strategy(cfg, **context) -> Strategy``, the app decides the context
        (number of nodes, evaluation data...).
    client : callable or None, default None
        Client side: the step the ClientApp runs for this method (its signature is the app's).
    flags : mapping, default {}
        Switches read by the app's code (``{"calibrate": False}``); read with :meth:`flag`.
    """

    name: str
    kind: str
    help: str
    strategy: Callable[..., Any] | None = None
    client: Callable[..., Any] | None = None
    flags: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} not in {KINDS}")
        object.__setattr__(self, "flags", MappingProxyType(dict(self.flags)))

    def flag(self, key: str, default: Any = None) -> Any:
        """The flag ``key`` of this method (``default`` if the row does not set it)."""
        return self.flags.get(key, default)


class MethodTable(Mapping[str, Method]):
    """An app's methods, by name, in the order of the paper's tables.

    Parameters
    ----------
    *methods : Method
        The rows; names must be unique.
    """

    def __init__(self, *methods: Method) -> None:
        names = [m.name for m in methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"method table: duplicate method {dup[0]!r}")
        if not methods:
            raise ValueError("method table: no method")
        self._rows = {m.name: m for m in methods}

    def __getitem__(self, name: str) -> Method:
        return self._rows[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._rows)

    def option(self, default: str | None = None):
        """The schema entry of the ``method`` key (choices = this table)."""
        from flowerbed.common.config import Option

        default = self.names[0] if default is None else default
        if default not in self._rows:
            raise ValueError(f"method table: default {default!r} is not a row")
        return Option(default, choices=self.names, help=" | ".join(self.names))

    def resolve(self, name: str) -> Method:
        """The row ``name``; a one-line :class:`ConfigError` naming the key if there is none."""
        if name not in self._rows:
            from flowerbed.common.config import ConfigError

            raise ConfigError(f"run config method={name!r}: must be one of {', '.join(self.names)}")
        return self._rows[name]

    def markdown(self) -> str:
        """The table as Markdown (for READMEs): method, kind, what it is."""
        lines = ["| method | kind | what it is |", "|---|---|---|"]
        lines += [f"| `{m.name}` | {m.kind} | {m.help} |" for m in self._rows.values()]
        return "\n".join(lines)
