"""The per-image settings, declared once: each one's name, the JSON that may hold it, who may set it, whether an
image's record says it, and its short word.

Everything that lists settings comes from `SETTINGS`. The dataclasses stay explicit, for reading, and
tests/test_settings.py checks that their fields are exactly the table's: `GenerationConfig` (a call's settings:
`per_call`), `PromptSpec` and the server's `Order` (what one prompt may set: `per_prompt`), `Job` (its index and
what an image depends on: `recorded`). Derived from it: a .jsonl line's keys (`prompts.JSONL_KEYS`), the record's
setting keys (`Pipeline.record`, `outputs.RECORD`, what replay reads back as settings), `GenerateRequest.config`
and the server's config.

Inside genkit every setting has one word, the library's (`num_inference_steps`, `guidance_scale`,
`num_images_per_prompt`). A .jsonl line may use the short word (`alias`: `steps`, `guidance`, `n`, as the
command line's flags do); each HTTP dialect keeps its own words in one map (`serve.a1111.FIELDS`,
`serve.openai.FIELDS`, `serve.gallery.FIELDS`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str  # the library's word: GenerationConfig's, PromptSpec's, Job's and the record's
    json: tuple[type, ...]  # the JSON types a .jsonl line (and a record) may hold it as
    per_call: bool = True  # a call sets it for all its prompts (GenerationConfig)
    per_prompt: bool = True  # one prompt may set its own (PromptSpec, a .jsonl line, a server order)
    recorded: bool = True  # an image depends on it: its Job holds it and its record says it
    edit: bool = False  # only an edit (an input image) has it: a text-to-image record does not say it
    digest: bool = False  # an input read from a file: its record (and a .jsonl line) may hold `<name>_sha256`
    optional: bool = False  # a record says it only where it applies (None: not said; a record without it is read so)
    alias: str | None = None  # the short word of a .jsonl line (and the command line's flag)

    @property
    def word(self) -> str:
        """What a .jsonl line calls it."""
        return self.alias or self.name


# In the record's order (the edit settings: the input, its strength, the mask, the outpaint).
SETTINGS = (
    Setting("prompt", (str,), per_call=False),
    Setting("negative_prompt", (str,)),
    Setting("seed", (int,)),
    Setting("num_images_per_prompt", (int,), recorded=False, alias="n"),
    Setting("batch_size", (int,), per_prompt=False, recorded=False),
    Setting("num_inference_steps", (int,), alias="steps"),
    Setting("guidance_scale", (int, float), alias="guidance"),
    Setting("width", (int,)),
    Setting("height", (int,)),
    Setting("scheduler", (str,)),
    # how the prompt's A1111 weight syntax is read (genkit.prompt_syntax): said only by a record whose prompt has some
    Setting("prompt_syntax", (str,), optional=True),
    # the hires fix (genkit.hires): a second, image-to-image pass at hires_scale times the size
    Setting("hires_scale", (int, float), optional=True),
    Setting("hires_strength", (int, float), optional=True),
    Setting("hires_steps", (int,), optional=True),
    Setting("hires_upscaler", (str,), optional=True),  # "latent", "lanczos" or an upscaling model's file
    # ControlNet units (genkit.controlnet): a model, a control image (path and sha256), preprocessor, weight, bounds
    Setting("control", (list,), optional=True),
    # an IP-Adapter (genkit.ipadapter): the adapter (path, digests), its reference image (path and sha256), its scale
    Setting("ip_adapter", (dict,), per_prompt=False, optional=True),
    # a path (in Python also a PIL image or an array); a list of several: an instruction edit's input images
    Setting("image", (str, list), edit=True, digest=True),
    Setting("strength", (int, float), edit=True),
    Setting("mask", (str,), edit=True, digest=True),
    Setting("outpaint", (str, dict), edit=True),  # "left=16,right=16"
)
BY_NAME = {setting.name: setting for setting in SETTINGS}


def names(**wanted: bool) -> tuple[str, ...]:
    """The settings' names whose flags have the given values, in the table's order: `names(per_prompt=True,
    edit=False)`."""
    return tuple(s.name for s in SETTINGS if all(getattr(s, flag) == value for flag, value in wanted.items()))


def digest_key(name: str) -> str:
    """The record's key for the sha256 of input `name` ("image" -> "image_sha256")."""
    return f"{name}_sha256"
