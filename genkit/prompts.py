"""Prompt lists: from arguments, a plain text file, or a `.jsonl` file with per-line options.

Plain text: one prompt per line; blank lines and lines starting with `#` are skipped.
JSONL: one object per line with `prompt` and optional `negative_prompt`, `seed`, `n`,
`steps`, `guidance` (the CLI's words), overriding the run's settings for that line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from genkit.errors import GenkitError

JSONL_KEYS = {"prompt": str, "negative_prompt": str, "seed": int, "n": int, "steps": int, "guidance": (int, float)}


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and the settings it overrides (None: use the run's)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    num_images_per_prompt: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None


def from_strings(prompts) -> list[PromptSpec]:
    return [p if isinstance(p, PromptSpec) else PromptSpec(str(p)) for p in prompts]


def read_prompts_file(path: str | Path) -> list[PromptSpec]:
    path = Path(path)
    if not path.is_file():
        raise GenkitError(f"prompts file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    specs = _read_jsonl(path, lines) if path.suffix.lower() == ".jsonl" else [
        PromptSpec(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    if not specs:
        raise GenkitError(f"prompts file {path} holds no prompts (one per line; # starts a comment)")
    return specs


def _read_jsonl(path: Path, lines: list[str]) -> list[PromptSpec]:
    specs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenkitError(f"{where} is not valid JSON ({exc.msg}); each line must be one object like "
                              '{"prompt": "a red circle"}') from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise GenkitError(f'{where} needs a non-empty "prompt" string, like {{"prompt": "a red circle"}}')
        for key, value in entry.items():
            if key not in JSONL_KEYS:
                raise GenkitError(f"{where}: unknown key {key!r} (valid: {', '.join(JSONL_KEYS)})")
            if not isinstance(value, JSONL_KEYS[key]) or isinstance(value, bool):
                raise GenkitError(f"{where}: {key} has the wrong type ({value!r})")
        specs.append(PromptSpec(
            prompt=entry["prompt"],
            negative_prompt=entry.get("negative_prompt"),
            seed=entry.get("seed"),
            num_images_per_prompt=entry.get("n"),
            num_inference_steps=entry.get("steps"),
            guidance_scale=float(entry["guidance"]) if "guidance" in entry else None,
        ))
    return specs
