"""The one exception type for user mistakes; the CLI prints it as one line and exits with code 2."""

from __future__ import annotations

import contextlib
import json
from contextvars import ContextVar


class GenkitError(Exception):
    """A user mistake: the message names the value and the fix.

    `param`: the library parameter the mistake is about (`num_inference_steps`, `lora`, `width` ...), or None. With
    it, `message` is what follows the setting's name ("must be at least 1, got 0"), and whoever shows the error puts
    its own name for the setting in front (`naming`): the parameter for a library caller (`str(error)`), its flag on
    the command line (genkit.cli), the request's field in an HTTP dialect (genkit.serve). Nobody reads the message to
    learn what it is about."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param

    def naming(self, name: str | None) -> str:
        """The error's line with its setting called `name`."""
        return f"{name} {self.message}" if self.param and name else self.message

    def __str__(self) -> str:
        return self.naming(self.param and (flag(self.param) if _COMMAND_LINE.get() else self.param))


# A library caller passes parameters and a shell user passes flags: a message names a setting with `term(name)`,
# which is the parameter's name (`lora`, `out`, `resume`), or its command-line flag while the CLI runs a command
# (`with command_line():` in genkit.cli). This table is the one place that knows the flags; `flag(param)` is a
# GenkitError's subject on the command line (a parameter without a flag, like `prompt`, keeps its name).
FLAGS = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "num_images_per_prompt": "--num-images",
         "scheduler": "--scheduler", "long_prompts": "--long-prompts", "out": "--out", "device": "--device",
         "cpu_offload": "--cpu-offload", "vae_slicing": "--vae-slicing", "vae_tiling": "--vae-tiling",
         "lora_dir": "--lora-dir", "port": "--port", "host": "--host", "threads": "--threads", "stop_at": "--stop-at",
         "resume": "--resume", "model": "--model", "seen": "--seen", "held_out": "--held-out",
         "attention": "--attention", "lora": "--lora", "processes": "--processes", "compile": "--compile",
         "prompts_file": "--prompts-file", "image": "--image", "mask": "--mask", "outpaint": "--outpaint",
         "negative_prompt": "--negative", "seed": "--seed", "overrides": "--set", "strength": "--strength",
         "allow_pickle": "--allow-pickle", "width": "--width", "height": "--height", "dtype": "--dtype", "memory": "--memory",
         "batch_size": "--batch-size", "api_key": "--api-key", "overwrite": "--overwrite",
         "instance_prompt": "--instance-prompt", "data.trigger_words": "--trigger", "config": "--config",
         "exact": "--exact", "quantize": "--quantize", "base": "--base",
         "models_dir": "--models-dir", "prompt_syntax": "--prompt-syntax", "hires_scale": "--hires",
         "hires_strength": "--hires-strength", "hires_steps": "--hires-steps", "hires_upscaler": "--hires-upscaler",
         "control": "--control", "ip_adapter": "--ip-adapter", "ip_image": "--ip-image"}
_COMMAND_LINE: ContextVar[bool] = ContextVar("genkit_command_line", default=False)


def term(name: str) -> str:
    """How the user at hand names setting `name`: its flag under the CLI, else the parameter itself."""
    return FLAGS[name] if _COMMAND_LINE.get() else name


def flag(param: str) -> str:
    """Parameter `param`'s command-line flag (its own name where no flag sets it)."""
    return FLAGS.get(param, param)


@contextlib.contextmanager
def command_line(on: bool = True):
    """Errors raised inside name settings by their command-line flags (`on=False`: by their parameters again, as
    `genkit serve` answers HTTP clients, who never typed a flag)."""
    token = _COMMAND_LINE.set(on)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """A library exception's first line (its type's name when it has no text), for a GenkitError's message."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def strict_json(text: str):
    """json.loads, refusing NaN, Infinity and -Infinity (Python's json accepts them; nan guidance ran unseen)."""
    return json.loads(text, parse_constant=_refuse_constant)
