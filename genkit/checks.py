"""The settings' checks, in one module: steps, guidance, sides, counts, seeds and the model's size multiple.

Each check refuses with a GenkitError about its parameter (`param`, the library's word), so every front end names
the setting its own way; given `where`, it names the file line or record that holds the value instead
("p.jsonl line 2: steps"). The engine (genkit.generate), a run's early checks (genkit.run), a prompts file
(genkit.prompts), a stored record (genkit.outputs), the CPU's memory check (genkit.cpu) and the trainers' recipes
(their ranges: DEFAULT_MAX_STEPS, DEFAULT_MAX_SIDE, MAX_SEED) all check here. Imports nothing of genkit but
genkit.errors.
"""

from __future__ import annotations

import math
import os

from genkit.errors import GenkitError

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 100.0  # A1111's slider stops at 30; serve's limit is the same 100
DEFAULT_MAX_STEPS = 1000  # the schedulers' training timesteps: more steps cannot sample anything new
DEFAULT_MAX_SIDE = 4096  # pixels; SDXL and Flux make 1024-2048, and --vae-tiling decodes past that


def max_steps() -> int:
    """The largest step count accepted: 1000, or $GENKIT_MAX_STEPS."""
    return _env_int("GENKIT_MAX_STEPS", DEFAULT_MAX_STEPS)


def max_side() -> int:
    """The largest width or height accepted: 4096, or $GENKIT_MAX_SIZE."""
    return _env_int("GENKIT_MAX_SIZE", DEFAULT_MAX_SIDE)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise GenkitError(f"${name} must be a whole number, got {text!r} (unset it for the default {default})") \
            from None
    if value < 1:
        raise GenkitError(f"${name} must be at least 1, got {value} (unset it for the default {default})")
    return value


def _refuse(reason: str, param: str, where: str | None) -> GenkitError:
    return GenkitError(f"{where} {reason}") if where else GenkitError(reason, param=param)


def check_steps(steps, where: str | None = None) -> None:
    """Steps from 1 to max_steps(); a billion steps would fill the memory with the scheduler's timesteps."""
    limit = max_steps()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise _refuse(f"must be at least 1, got {steps}", "num_inference_steps", where)
    if steps > limit:
        raise _refuse(f"must be at most {limit}, got {steps} (samplers gain nothing past their {DEFAULT_MAX_STEPS} "
                      "training timesteps; set GENKIT_MAX_STEPS to raise the limit)", "num_inference_steps", where)


def check_guidance(guidance, where: str | None = None) -> None:
    """A finite guidance from 0 to MAX_GUIDANCE (inf paints black, nan turns guidance off unseen)."""
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise _refuse(f"must be a finite number, got {guidance} (try 4 to 8; 1 or less turns it off)",
                      "guidance_scale", where)
    if guidance < 0:
        raise _refuse(f"must be 0 or more, got {guidance} (1 or less turns it off)", "guidance_scale", where)
    if guidance > MAX_GUIDANCE:
        raise _refuse(f"must be at most {MAX_GUIDANCE:g}, got {guidance} (images burn out long before; try 4 to 8)",
                      "guidance_scale", where)


def check_side(value, param: str, where: str | None = None) -> None:
    """A width or height (`param`) from 1 to max_side() pixels (the model's own multiple: check_multiple)."""
    limit = max_side()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(f"must be a positive whole number of pixels, got {value}", param, where)
    if value > limit:
        raise _refuse(f"must be at most {limit} pixels, got {value} (set GENKIT_MAX_SIZE to raise the limit; memory "
                      "grows with width x height)", param, where)


def check_count(count, param: str, where: str | None = None) -> None:
    """A count of images (`param`: num_images_per_prompt, batch_size) of 1 or more."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise _refuse(f"must be at least 1, got {count}", param, where)


def check_seed(seed, where: str | None = None) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise _refuse(f"must be an integer from 0 to {MAX_SEED}, got {seed}", "seed", where)


def check_multiple(name: str, value, multiple: int, where: str = "") -> int:
    """`value` as an image side: a whole number that `multiple` divides (at least `multiple`); else one line naming
    the two nearest sides that work. The one check of a side for generation, editing and training."""
    if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
        low = max(multiple, value // multiple * multiple) if isinstance(value, int) and not isinstance(value, bool) \
            else multiple
        raise GenkitError(f"must be a positive multiple of {multiple}{where}, got {value} "
                          f"(try {low} or {low + multiple})", param=name)
    return value
