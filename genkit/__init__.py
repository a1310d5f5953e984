"""genkit: text-to-image generation and LoRA fine-tuning on any diffusers model, with a tiny
embedded default (genkit-mini) that runs offline on a CPU.

    import genkit
    pipe = genkit.load()                      # genkit-mini; or a preset, a folder, a hub id (lora=[...] too)
    result = pipe.generate(["a red circle on the left"], seed=11)
    result.images[0].save("circle.png")

Importing genkit is cheap: torch and diffusers load on first use.
"""

import logging as _logging

from genkit.errors import GenkitError

__version__ = "0.1.0"


class _ImportNoise(_logging.Filter):
    """Drops what torchao logs when it is imported (diffusers imports it whenever it is installed): a line per CUDA
    extension it cannot load on this machine, and torch's deprecation note on its enums. Nothing else is dropped,
    so a one-line error stays one line."""

    NOISE = ("Failed to load ", "is an Enum subclass and is now natively supported by torch.compile")

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.NOISE[0]) and ".so" in message) and self.NOISE[1] not in message


for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).addFilter(_ImportNoise())
__all__ = ["GenkitError", "GenerationConfig", "GenerationResult", "Pipeline", "PromptSpec", "load", "train_lora",
           "train_controlnet", "__version__"]

_LAZY = {
    "load": ("genkit.loader", "load"),
    "Pipeline": ("genkit.generate", "Pipeline"),
    "GenerationConfig": ("genkit.generate", "GenerationConfig"),
    "GenerationResult": ("genkit.generate", "GenerationResult"),
    "PromptSpec": ("genkit.prompts", "PromptSpec"),
    "train_lora": ("genkit.train.lora", "train_lora"),
    "train_controlnet": ("genkit.train.controlnet", "train_controlnet"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'genkit' has no attribute {name!r}")
