"""genkit: text-to-image generation and LoRA fine-tuning on any diffusers model, with a tiny
embedded default (genkit-mini) that runs offline on a CPU.

    import genkit
    pipe = genkit.load()                      # genkit-mini; or a preset, a folder, a hub id (lora=[...] too)
    result = pipe.generate(["a red circle on the left"], seed=11)
    result.images[0].save("circle.png")

Importing genkit is cheap: torch and diffusers load on first use.
"""

from genkit.errors import GenkitError

__version__ = "0.1.0"
__all__ = ["GenkitError", "GenerationConfig", "GenerationResult", "Pipeline", "PromptSpec", "load", "train_lora",
           "__version__"]

_LAZY = {
    "load": ("genkit.loader", "load"),
    "Pipeline": ("genkit.generate", "Pipeline"),
    "GenerationConfig": ("genkit.generate", "GenerationConfig"),
    "GenerationResult": ("genkit.generate", "GenerationResult"),
    "PromptSpec": ("genkit.prompts", "PromptSpec"),
    "train_lora": ("genkit.train.lora", "train_lora"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'genkit' has no attribute {name!r}")
