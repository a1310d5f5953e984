"""What `genkit data check` shows of a model: the aspect-ratio buckets a LoRA run on it would train in.

The buckets depend on the recipe's data section (resolution, resolutions, buckets, bucket_step, bucket_max_ratio,
with the family's table laid under it as `genkit train lora` does) and on two numbers of the model: its own
training size (for `data.resolution = 0`) and its side multiple. Both are read without any weights: a diffusers
pipeline's from its configs on the meta device (genkit.memory.meta_model), genkit's own small format by loading it
on the CPU. `genkit.data.imagefolder.check_dataset` then places every image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from genkit.checks import check_multiple
from genkit.data.buckets import BucketSpec
from genkit.errors import GenkitError
from genkit.train.recipe import resolve


@dataclass(frozen=True)
class ModelSides:
    family: str  # genkit's family name, for the recipe's family table
    default_size: int  # the model's own training size in pixels (data.resolution = 0)
    multiple: int  # every bucket side is a multiple of this


def model_sides(model: str | None) -> ModelSides:
    """A model's family, own size and side multiple, from its configs (no weights read), else by loading it on the
    CPU (genkit's own format, which has no diffusers configs to build on the meta device)."""
    from genkit import memory

    try:
        meta = memory.meta_model(model)
    except GenkitError as refused:
        import torch

        import genkit

        threads = torch.get_num_threads()
        try:
            pipeline = genkit.load(model, device="cpu", threads=1)  # one thread: nothing runs, nothing to advise
        except Exception:  # no weights (a folder of configs and tokenizer only), or not a model at all
            raise refused from None
        finally:
            torch.set_num_threads(threads)
        return ModelSides(pipeline.family.name, pipeline.family.default_size(pipeline.pipe), pipeline.size_factor)
    family, pipe = meta.family, meta.pipe
    size = int(meta.defaults.get("width") or family.default_size(pipe))
    return ModelSides(family.name, size, family.multiple(pipe))


def bucket_spec(model: str | None = None, *, config=None, overrides=(), sides: ModelSides | None = None) -> BucketSpec:
    """The buckets `genkit train lora DATA --model model --config config --set ...` would use."""
    sides = sides or model_sides(model)
    data = resolve(config, overrides, family=sides.family).data
    if not data.resolution:
        data = replace(data, resolution=max(data.resolutions, default=0) or sides.default_size)
    for size in data.sizes:
        check_multiple("data.resolution", size, sides.multiple, f" for {sides.family} models")
    return BucketSpec(data.sizes, sides.multiple, data.buckets, data.bucket_step, data.bucket_max_ratio)
