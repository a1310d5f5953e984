"""Model families: one small module each (base.py's `Family` is the protocol they answer).

Adding a family is adding a module here with a `FAMILY` object (found by `all_families`), plus one
tiny-model entry in `genkit.testing.FAMILIES` (and, where its projection names differ, a table in
configs/lora.toml); the engine, the loader, the trainers and the server never name a family.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from genkit.errors import GenkitError


@functools.lru_cache(maxsize=1)
def _modules() -> tuple:
    """Every module of this package that defines a `FAMILY` (base and helpers define none), by name."""
    found = (importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__))
    return tuple(module for module in found if hasattr(module, "FAMILY"))


def all_families() -> list:
    return [module.FAMILY for module in _modules()]


def names() -> list[str]:
    return [family.name for family in all_families()]


def get(name: str):
    for family in all_families():
        if family.name == name:
            return family
    raise GenkitError(f"unknown model family {name!r} (known: {', '.join(names())})")


def detect(class_name: str | None, where: str = "the model"):
    """The family whose pipeline class is `class_name` (model_index.json's `_class_name`)."""
    for family in all_families():
        if class_name in family.pipeline_classes:
            return family
    known = ", ".join(f"{f.name} ({'/'.join(f.pipeline_classes)})" for f in all_families())
    raise GenkitError(f"{where} is a {class_name or 'pipeline without _class_name'}, a model family genkit does not "
                      f"know yet (known: {known})")


def for_lora_components(components: set[str]):
    """The family a LoRA file's components point to when nothing else says (no record, no --model): the first
    diffusers-format UNet family with a kohya layout whose components hold them all, or None (a transformer's
    component names no family: Flux, Qwen-Image and Z-Image LoRAs all adapt a `transformer`)."""
    for family in all_families():
        if family.file_format == "diffusers" and family.kohya and family.kohya.layer is None and \
                components <= set(family.kohya.prefixes):
            return family
    return None
