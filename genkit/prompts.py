"""Prompt lists: from arguments, a plain text file, or a `.jsonl` file with per-line options.

Plain text: one prompt per line; blank lines and lines starting with `#` are skipped.
JSONL: one object per line with `prompt` and optional `negative_prompt`, `seed`, `n`,
`steps`, `guidance` (the CLI's words), `width`, `height`, `scheduler`, and for edits `image`,
`mask`, `strength`, `outpaint`, overriding the run's settings for that line.

A line may also use the library's words (`num_inference_steps`, `guidance_scale`, `num_images_per_prompt`):
the short ones are only aliases (genkit.settings), and a line is read into a PromptSpec in the library's words.
So a run's `manifest.jsonl` is a prompts file too: its lines are image records; what a record says about how
it was run (model, LoRAs, device, versions, file, ...: genkit.outputs.RECORD_ONLY) is left to the command
line, and a recorded input's `image_sha256` / `mask_sha256` is checked against the file.
`genkit generate --prompts-file outputs/manifest.jsonl --model M` makes the run again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from genkit import checks, settings
from genkit.errors import GenkitError, strict_json
from genkit.outputs import RECORD_ONLY

# a .jsonl line's keys and the JSON types of each: every setting a prompt may set, by its short word (steps, guidance,
# n: genkit.settings' aliases), and the sha256 of each input file
JSONL_KEYS = {**{s.word: s.json for s in settings.SETTINGS if s.per_prompt},
              **{settings.digest_key(s.name): s.json for s in settings.SETTINGS if s.digest}}  # a list for a list
# image / mask paths in a .jsonl: relative to the file's own folder, else to the working folder
JSONL_WORDS = {s.alias: s.name for s in settings.SETTINGS if s.alias}  # a line's short words -> the library's


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
    prompt_syntax: str | None = None  # "a1111" (weights read) or "plain" (genkit.prompt_syntax)
    hires_scale: float | None = None  # the hires fix (genkit.hires): its scale, strength, steps and upscaler
    hires_strength: float | None = None
    hires_steps: int | None = None
    hires_upscaler: str | None = None
    control: object = None  # ControlNet units (genkit.controlnet): "model=PATH,image=PATH,..." strings or dicts
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


def _check_number(name: str, value, where: str) -> None:
    """The range check of a .jsonl line's number (the others are checked by the plan, with the model)."""
    if name == "seed":
        checks.check_seed(value, where)
    elif name == "num_images_per_prompt":
        checks.check_count(value, name, where)
    elif name == "num_inference_steps":
        checks.check_steps(value, where)
    elif name == "guidance_scale":
        checks.check_guidance(value, where)


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
        entry = _library_words(entry, where)
        for name, (word, value) in entry.items():
            if word not in JSONL_KEYS:
                raise GenkitError(f"{where}: unknown key {word!r} (valid: {', '.join(JSONL_KEYS)})")
            if not isinstance(value, JSONL_KEYS[word]) or isinstance(value, bool):
                raise GenkitError(f"{where}: {word} has the wrong type ({value!r})")
            _check_number(name, value, f"{where}: {word}")
        values = {name: value for name, (_, value) in entry.items()}
        if "guidance_scale" in values:
            values["guidance_scale"] = float(values["guidance_scale"])
        for name in settings.names(digest=True):  # an input's path, found and checked against its sha256
            values[name] = _input(path, values, name, where)
            values.pop(settings.digest_key(name), None)
        specs.append(PromptSpec(**values))
    return specs


def _library_words(entry: dict, where: str) -> dict:
    """{library word: (the line's word, value)}: a line's keys by the library's words (`steps` and a record's
    `num_inference_steps` both mean num_inference_steps, which a .jsonl line calls `steps`); a record's run-only
    keys (model, device, ...) dropped."""
    out = {}
    for key, value in entry.items():
        if key in RECORD_ONLY:
            continue
        name = JSONL_WORDS.get(key, key)
        word = settings.BY_NAME[name].word if name in settings.BY_NAME else key
        if name in out:
            raise GenkitError(f"{where}: {name!r} and {word!r} say the same thing; keep one")
        out[name] = (word, value)
    return out


def _input(path: Path, entry: dict, key: str, where: str) -> str | list[str] | None:
    """An input image's path: beside the prompts file, else from the working folder; its sha256 checked if given. A
    list (an instruction edit's input images) is a list of such paths, its sha256s a list in the same order."""
    if key not in entry:
        return None
    if isinstance(entry[key], list):
        given, want = entry[key], entry.get(settings.digest_key(key))
        if not given or not all(isinstance(one, str) for one in given) or \
                (want is not None and (not isinstance(want, list) or len(want) != len(given))):
            raise GenkitError(f"{where}: {key} must be a path or a non-empty list of paths (with as many sha256s)")
        return [_input(path, {key: one, **({} if want is None else {f"{key}_sha256": sha})}, key, where)
                for one, sha in zip(given, want or given)]
    given = entry[key]
    if not isinstance(given, str):
        raise GenkitError(f"{where}: {key} has the wrong type ({given!r})")
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
