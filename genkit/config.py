"""Recipes as TOML: read with tomllib into dataclasses, with `--set section.key=value` overrides.

Unknown sections or keys are errors, so a typo in a recipe never trains silently with a default. Every number of a
recipe is declared with its range (`number`), and checked against it (finite, inside) before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from genkit.errors import GenkitError


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise GenkitError(f"{path} not found (pass an existing .toml file)", param="config")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise GenkitError(f"{path} is not valid TOML: {exc}", param="config") from None


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `section.key=value` strings; values are parsed as TOML literals, else kept as strings."""
    for item in overrides or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GenkitError(f"expects section.key=value, got {item!r}", param="overrides")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        *sections, leaf = key.strip().split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = parsed
    return raw


@dataclass(frozen=True)
class Range:
    """Where a recipe number may lie: from `low` to `high` (None: unbounded), each end included unless open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False  # an int

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.whole and not isinstance(value, int):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        kind, show = ("a whole number", str) if self.whole else ("a number", lambda v: f"{v:g}")
        if self.low is not None and self.high is not None:
            return (f"{kind + ' ' if self.whole else ''}in {'(' if self.low_open else '['}{show(self.low)}, "
                    f"{show(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {show(self.low)}"
        return f"{kind} {'<' if self.high_open else '<='} {show(self.high)}"


def number(default, low=None, high=None, *, low_open: bool = False, high_open: bool = False):
    """A recipe field holding a number: its default and its range (a whole number when the default is an int)."""
    spec = Range(low, high, low_open, high_open, whole=isinstance(default, int))
    return dataclasses.field(default=default, metadata={"range": spec})


def check_number(key: str, value, spec: Range) -> None:
    if not spec.holds(value):
        raise GenkitError(f"{key} must be {spec}, got {value!r}")


def check_ranges(config, where: str = "") -> None:
    """Every ranged number of dataclass `config` (and of the dataclasses it holds) inside its range."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{where}{field.name}.")
        elif "range" in field.metadata:
            check_number(f"{where}{field.name}", value, field.metadata["range"])


def build(cls, raw: dict, where: str = ""):
    """Build dataclass `cls` from a dict, recursing into dataclass-typed fields; unknown keys raise."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise GenkitError(f"unknown key {where}{unknown[0]} in config (valid: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in raw.items():
        default = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        sub = type(default()) if default is not None else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = build(sub, value, f"{where}{name}.")
        elif isinstance(value, list):
            value = tuple(value)
        spec = fields[name].metadata.get("range")
        if spec is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            check_number(f"{where}{name}", value, spec)  # nan, inf, 2.5 steps: named with the range
        _check_type(f"{where}{name}", fields[name].default, value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise GenkitError(f"invalid config: {exc}") from None


def _check_type(key: str, default, value) -> None:
    """A value of the default's kind (an int where the default is an int, a number where it is a float ...);
    a key whose default is None takes any value."""
    if default is None or default is dataclasses.MISSING or dataclasses.is_dataclass(default):
        return
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (tuple,)}.get(type(default))
    if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        raise GenkitError(f"{key} must be {type(default).__name__.replace('tuple', 'a list')}, got {value!r} "
                          f"(the default is {default!r})")


def load(cls, path: str | Path | None, overrides=()):
    """Dataclass `cls` from a TOML file (or its defaults when `path` is None) with `section.key=value` overrides."""
    raw = read_toml(path) if path else {}
    return build(cls, apply_overrides(raw, overrides))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
