"""The vocabulary of the config's value rules, shared by every section's rule table.

A section lists its rules as a table ``{field: Rule}`` next to its dataclass (``DATA_RULES`` in
:mod:`pretrain.data.config`, ``MODEL_RULES`` in :mod:`pretrain.methods.config`, the optimiser,
train and log tables in :mod:`pretrain.config`) plus one function for the rules that relate
several fields. A broken rule is a :class:`Problem`; :func:`pretrain.config.load_config` turns the
first one into a ``ConfigError``. This module imports nothing of the project, so that every
section's config module can use it without an import cycle.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Choice(str, Enum):
    """A config field with a fixed set of string values; OmegaConf rejects any other value.

    Members are strings (``Loader.ffcv == "ffcv"``, usable as dict keys for ``"ffcv"``), and print
    and format as their value: since Python 3.11 a ``(str, Enum)`` member would otherwise format
    as ``Loader.ffcv`` in f-strings, which log lines, paths and error messages would show.
    OmegaConf looks a YAML value up by member *name*, so every subclass names each member by its value.
    """

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def choice_enum(name: str, values: Iterable[str], module: str) -> type[Choice]:
    """A :class:`Choice` whose members are ``values`` (for choices owned by another module's table).

    ``module`` must be the caller's ``__name__`` so that members pickle (DataLoader workers, submitit).
    """
    return Choice(name, [(v, v) for v in values], module=module, qualname=name)  # type: ignore[return-value]


@dataclass(frozen=True)
class Rule:
    """What a field accepts: ``ok`` tests a value; ``text`` (or a function giving it, for a registry
    that fills up after the table is built) says what is allowed."""

    text: str | Callable[[], str]
    ok: Callable[[Any], bool]

    @property
    def allowed(self) -> str:
        """What the field accepts, as the error message says it."""
        return self.text() if callable(self.text) else self.text


@dataclass(frozen=True)
class Problem:
    """A broken rule: the full key, the value found and what the key accepts."""

    key: str
    value: Any
    allowed: str

    def message(self) -> str:
        """One line naming the key, what it accepts and the value found."""
        return f"config key '{self.key}' must be {self.allowed}, got {show(self.value)}"


def show(value: Any) -> str:
    """A value as the user wrote it (enum members as their plain value)."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def interval(spec: str) -> Rule:
    """Numbers in an interval written as in maths: ``"[0, 1)"``, ``"(0, 1]"``, ``"(0, inf)"``.

    NaN fails every interval (each comparison with it is false).
    """
    lo_b, hi_b = spec[0], spec[-1]
    if lo_b not in "[(" or hi_b not in "])":
        raise ValueError(f"interval {spec!r}: expected brackets like '[0, 1)'")
    lo, hi = (float(x) for x in spec[1:-1].split(","))

    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        above = lo < v or (lo_b == "[" and v == lo)
        below = v < hi or (hi_b == "]" and v == hi)
        return above and below

    if math.isinf(hi):
        text = f"{'>=' if lo_b == '[' else '>'} {_number(lo)}"
    else:
        text = f"in {lo_b}{_number(lo)}, {_number(hi)}{hi_b}"
    return Rule(text, ok)


def at_least(n: float) -> Rule:
    """Numbers ``>= n``."""
    return interval(f"[{n}, inf)")


POSITIVE = interval("(0, inf)")
NON_NEGATIVE = interval("[0, inf)")
PROBABILITY = interval("[0, 1]")
NON_EMPTY = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")


def one_of(values: Iterable[Any] | Callable[[], Iterable[Any]], what: str = "") -> Rule:
    """A value from a fixed set, or from a registry read when the rule is checked (``values`` a callable:
    the registry may not be importable, or complete, when the rule table is built)."""

    def current() -> list[Any]:
        return sorted(values() if callable(values) else values)

    return Rule(lambda: f"one of {what + ' ' if what else ''}{show(current())}", lambda v: v in current())


def entries(rule: Rule, length: int | None = None, names: str = "") -> Rule:
    """A list whose entries each satisfy ``rule`` (of exactly ``length`` entries when given)."""
    count = f"{length} " if length is not None else ""
    named = f" ({names})" if names else ""

    def ok(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and (length is None or len(v) == length) and all(rule.ok(x) for x in v)

    return Rule(f"a list of {count}numbers{named}, each {rule.allowed}", ok)


def check_fields(section: Any, prefix: str, rules: Mapping[str, Rule]) -> Iterator[Problem]:
    """The broken rules of a section's table, in table order; keys are ``prefix.field``."""
    for name, rule in rules.items():
        value = getattr(section, name)
        if not rule.ok(value):
            yield Problem(f"{prefix}.{name}" if prefix else name, value, rule.allowed)


def non_finite(obj: Any, prefix: str = "") -> Iterator[Problem]:
    """Every float (or list entry) of a dataclass tree that is NaN or infinite.

    YAML's ``.nan``/``.inf`` and overrides such as ``optim.base_lr=nan`` reach the schema as floats;
    no field of a run means anything at NaN or infinity, and they would surface much later as a NaN
    loss, a ZeroDivisionError or an overflow instead of a config error.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            yield from non_finite(value, key)
        elif isinstance(value, float) and not math.isfinite(value):
            yield Problem(key, value, "a finite number")
        elif isinstance(value, (list, tuple)) and any(isinstance(x, float) and not math.isfinite(x) for x in value):
            yield Problem(key, value, "a list of finite numbers")


__all__ = ["Choice", "choice_enum", "Rule", "Problem", "show", "interval", "at_least", "POSITIVE", "NON_NEGATIVE",
           "PROBABILITY", "NON_EMPTY", "one_of", "entries", "check_fields", "non_finite"]
