"""Request bodies: JSON read and checked field by field, with errors that name the field.

FastAPI's own body parsing would answer in FastAPI's shape only; reading the body here lets
each dialect answer in its own (see errors.py). Models are strict: a string where a number
belongs is refused, not coerced. A top-level `null` means the field's default.
"""

from __future__ import annotations

import json
import math

from pydantic import BaseModel, ConfigDict, ValidationError

from genkit.serve.errors import ApiError


class Body(BaseModel):
    """Base of request models: unknown fields ignored (clients send many), known ones strictly typed."""

    model_config = ConfigDict(extra="ignore", strict=True)


class LoraRef(Body):
    """A LoRA from the server's --lora-dir by name; `weight` (A1111's word) or `scale`."""

    name: str
    weight: float | None = None
    scale: float | None = None

    @property
    def value(self) -> float:
        return self.scale if self.scale is not None else (self.weight if self.weight is not None else 1.0)


async def read_json(request) -> object:
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", param="body")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ApiError(400, f"the request body is not valid JSON{where}", param="body") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse(model: type[BaseModel], data, *, status: int = 422):
    """Validate `data` against `model`; the first problem becomes an ApiError naming its field."""
    if not isinstance(data, dict):
        raise ApiError(status, f"the request body must be a JSON object, got {type(data).__name__}", param="body")
    data = {key: value for key, value in data.items() if value is not None}  # null: the default, as clients mean it
    for field, value in _numbers(data):
        if not math.isfinite(value):
            raise ApiError(status, f"{field}: {value} is not a finite number", param=field)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        got = "" if first["type"] == "missing" else f" (got {_short(first.get('input'))})"
        raise ApiError(status, f"{field}: {first['msg']}{got}", param=field) from None


async def read_model(request, model: type[BaseModel], *, status: int = 422):
    return parse(model, await read_json(request), status=status)


def _numbers(data, path: str = ""):
    """(field path, value) of every float in the body (1e400 parses as infinity)."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, float):
            yield where, value
        elif isinstance(value, (dict, list)):
            yield from _numbers(value, where)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
