"""Prompt lists: from arguments, a plain text file, or a `.jsonl` file with per-line options.

Plain text: one prompt per line; blank lines and lines starting with `#` are skipped.
JSONL: one object per line with `prompt` and optional `negative_prompt`, `seed`, `n`,
`steps`, `guidance` (the CLI's words), `width`, `height`, `scheduler`, and for edits `image`,
`mask`, `strength`, `outpaint`, overriding the run's settings for that line.

A run's `manifest.jsonl` is a prompts file too: its lines are image records, whose words
(`num_inference_steps`, `guidance_scale`, `num_images_per_prompt`) mean `steps`, `guidance`, `n`;
what a record says about how it was run (model, LoRAs, device, versions, file, ...) is left to the
command line, and a recorded input's `image_sha256` / `mask_sha256` is checked against the file.
`genkit generate --prompts-file outputs/manifest.jsonl --model M` makes the run again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from genkit.checks import check_count, check_guidance, check_seed, check_steps
from genkit.errors import GenkitError, strict_json

JSONL_KEYS = {"prompt": str, "negative_prompt": str, "seed": int, "n": int, "steps": int, "guidance": (int, float),
              "width": int, "height": int, "scheduler": str,
              "image": str, "mask": str, "strength": (int, float), "outpaint": (str, dict),
              "image_sha256": str, "mask_sha256": str}
# image / mask paths in a .jsonl: relative to the file's own folder, else to the working folder
RECORD_WORDS = {"num_inference_steps": "steps", "guidance_scale": "guidance", "num_images_per_prompt": "n"}
# what an image record (manifest.jsonl) says about how it was made; the command line decides these
RECORD_ONLY = frozenset({"index", "file", "skipped", "model", "family", "lora", "attention", "dtype", "device",
                         "exact", "threads", "versions", "compiled", "prompt_truncated", "prompt_chunks",
                         "prompt_unknown_words"})


class PromptWarning(UserWarning):
    """A prompt the model cannot read whole (longer than its text encoder's tokens)."""


class UnknownWordsWarning(UserWarning):
    """A prompt with words the model was never taught (genkit-mini: words outside its shapes world)."""


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and the settings it overrides (None: use the run's)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    num_images_per_prompt: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    image: object = None  # an input to edit (path, PIL image or array; genkit.edit), with its mask and strength
    mask: object = None
    strength: float | None = None
    outpaint: object = None  # "left=16,right=16"


def from_strings(prompts) -> list[PromptSpec]:
    return [p if isinstance(p, PromptSpec) else PromptSpec(str(p)) for p in prompts]


def read_prompts_file(path: str | Path) -> list[PromptSpec]:
    path = Path(path)
    if not path.is_file():
        raise GenkitError(f"prompts file not found: {path}")
    lines = _read_lines(path)
    specs = _read_jsonl(path, lines) if path.suffix.lower() == ".jsonl" else [
        PromptSpec(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    if not specs:
        raise GenkitError(f"prompts file {path} holds no prompts (one per line; # starts a comment)")
    return specs


def _read_lines(path: Path) -> list[str]:
    """The file's lines as text; a binary or non-UTF-8 file is named with the line of its first bad byte."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GenkitError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise GenkitError(f"prompts file {path} line {line} is not UTF-8 text (byte {exc.start}); "
                          "give a text or .jsonl file saved as UTF-8") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise GenkitError(f"prompts file {path} line {line} holds a NUL byte, so it is binary, not text; "
                          "give a text or .jsonl file")
    return text.splitlines()


_NUMBERS = {  # jsonl key -> its check
    "seed": check_seed, "n": partial(check_count, param="num_images_per_prompt"), "steps": check_steps,
    "guidance": check_guidance,
}


def _read_jsonl(path: Path, lines: list[str]) -> list[PromptSpec]:
    specs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = strict_json(line)
        except (json.JSONDecodeError, ValueError, RecursionError) as exc:
            raise GenkitError(f"{where} is not valid JSON ({getattr(exc, 'msg', exc)}); each line must be one "
                              'object like {"prompt": "a red circle"}') from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise GenkitError(f'{where} needs a non-empty "prompt" string, like {{"prompt": "a red circle"}}')
        entry = _plain_words(entry, where)
        for key, value in entry.items():
            if key not in JSONL_KEYS:
                raise GenkitError(f"{where}: unknown key {key!r} (valid: {', '.join(JSONL_KEYS)})")
            if not isinstance(value, JSONL_KEYS[key]) or isinstance(value, bool):
                raise GenkitError(f"{where}: {key} has the wrong type ({value!r})")
            if key in _NUMBERS:
                _NUMBERS[key](value, where=f"{where}: {key}")
        specs.append(PromptSpec(
            prompt=entry["prompt"],
            negative_prompt=entry.get("negative_prompt"),
            seed=entry.get("seed"),
            num_images_per_prompt=entry.get("n"),
            num_inference_steps=entry.get("steps"),
            guidance_scale=float(entry["guidance"]) if "guidance" in entry else None,
            width=entry.get("width"), height=entry.get("height"), scheduler=entry.get("scheduler"),
            image=_input(path, entry, "image", where), mask=_input(path, entry, "mask", where),
            strength=entry.get("strength"), outpaint=entry.get("outpaint"),
        ))
    return specs


def _plain_words(entry: dict, where: str) -> dict:
    """A record's words as a prompts file's (`num_inference_steps` -> `steps`), its run-only keys dropped."""
    out = {}
    for key, value in entry.items():
        if key in RECORD_ONLY:
            continue
        word = RECORD_WORDS.get(key, key)
        if word in out or (word != key and word in entry):
            raise GenkitError(f"{where}: {key!r} and {word!r} say the same thing; keep one")
        out[word] = value
    return out


def _input(path: Path, entry: dict, key: str, where: str) -> str | None:
    """An input image's path: beside the prompts file, else from the working folder; its sha256 checked if given."""
    if key not in entry:
        return None
    given = entry[key]
    if given.startswith("<"):
        raise GenkitError(f"{where}: the {key} was given in memory ({given}), not as a file; write it to a file and "
                          f"put its path in {key!r}")
    found = next((c for c in (path.parent / given, Path(given)) if c.is_file()), None)
    if found is None:
        raise GenkitError(f"{where}: {key} file {given} not found (beside {path.name} or in the working folder)")
    want = entry.get(f"{key}_sha256")
    if want is not None:
        from genkit.images import sha256_of

        if sha256_of(found) != want:
            raise GenkitError(f"{where}: {key} file {found} is not the one recorded (sha256 differs); restore the "
                              "original or drop the line's sha256")
    return str(found)
