"""Qwen-Image-Edit-2509 and 2511 (diffusers' QwenImageEditPlusPipeline): Qwen-Image-Edit reading several input
images at once ("put the cat of picture 1 on the sofa of picture 2"). Each is read by Qwen2.5-VL at about 384x384
pixels, labelled "Picture 1:", "Picture 2:" ... in the prompt, and by the VAE at about a megapixel; the output is
drawn from noise beside them. Everything else is Qwen-Image-Edit's (families/qwen_image_edit.py).

diffusers' QwenImageEditPlusPipeline refuses a call of more than one prompt; it takes one prompt's several images
(`num_images_per_prompt`). So a batch runs as one call per run of equal prompts, in order, each image with its own
generator; the engine's step callback follows the last call, with the earlier calls' final latents before its own.
"""

import functools
import itertools

import numpy as np
import torch

from genkit.families.qwen_image_edit import QwenImageEdit, each_prompt

MAX_REFERENCES = 4  # input images an edit reads: Qwen's model cards show 1 to 3; each costs a megapixel of latents


class QwenImageEditPlus(QwenImageEdit):
    name = "qwen-image-edit-plus"
    title = "Qwen-Image-Edit-2509/2511"
    pipeline_classes = ("QwenImageEditPlusPipeline",)
    references = MAX_REFERENCES

    def instruct_class(self, pipeline_class):
        return _call_a_prompt(each_prompt(pipeline_class))


class _CallAPrompt:
    """A pipeline called once per run of equal (prompt, negative prompt) of a batch."""

    def __call__(self, prompt, negative_prompt=None, generator=None, callback_on_step_end=None, **kwargs):
        rows = list(zip(prompt, negative_prompt or [None] * len(prompt)))
        runs = [(key, len(list(group))) for key, group in itertools.groupby(rows)]
        images, done, start = [], [], 0
        for number, ((text, negative), count) in enumerate(runs):
            seen = {}
            step = _follow(callback_on_step_end, done, seen) if number == len(runs) - 1 else _keep(seen)
            out = super().__call__(prompt=[text], negative_prompt=None if negative is None else [negative],
                                   num_images_per_prompt=count, generator=generator[start:start + count],
                                   callback_on_step_end=step, **kwargs)
            images.append(out.images)
            done.append(seen["latents"])
            start += count
        out.images = np.concatenate(images) if isinstance(images[0], np.ndarray) else sum(map(list, images), [])
        return out


def _keep(seen: dict):
    def step(pipe, index, timestep, tensors):
        seen["latents"] = tensors["latents"]
        return tensors

    return step


def _follow(callback, done: list, seen: dict):
    """The engine's callback on the last call's steps, seeing the batch's latents (the earlier calls' final ones)."""

    def step(pipe, index, timestep, tensors):
        seen["latents"] = tensors["latents"]
        if callback is None:
            return tensors
        rows = tensors["latents"].shape[0]
        back = callback(pipe, index, timestep, {**tensors, "latents": torch.cat([*done, tensors["latents"]])})
        return {**back, "latents": back["latents"][-rows:]}

    return step


@functools.lru_cache(maxsize=None)
def _call_a_prompt(pipeline_class):
    return type(pipeline_class.__name__, (_CallAPrompt, pipeline_class), {})


FAMILY = QwenImageEditPlus()
