"""Recipes as TOML: read with tomllib into dataclasses, with `--set section.key=value` overrides.

Unknown sections or keys are errors, so a typo in a recipe never trains silently with a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
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
