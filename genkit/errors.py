"""The one exception type for user mistakes; the CLI prints it as one line and exits with code 2."""

from __future__ import annotations

import json


class GenkitError(Exception):
    """A user mistake: the message names the value and the fix."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """A library exception's first line (its type's name when it has no text), for a GenkitError's message."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def strict_json(text: str):
    """json.loads, refusing NaN, Infinity and -Infinity (Python's json accepts them; nan guidance ran unseen)."""
    return json.loads(text, parse_constant=_refuse_constant)
