"""genkit-mini's ControlNet: diffusers' ControlNetModel beside its pixel-space UNet.

The least hand-written way, and why: diffusers' StableDiffusionControlNetPipeline cannot run genkit-mini (it reads
prompts with CLIP and denoises VAE latents), so genkit-mini's own denoising loop (GenkitMiniPipeline.__call__)
calls the ControlNet, and everything it calls is diffusers':

- the model is `ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,))`: the UNet's encoder and
  middle copied, zero convolutions out, and a one-level conditioning embedding, because the sample is the image
  (pixel space: no halving between the control image and the sample; SD's four levels take 512 down to 64);
- several at once are diffusers' `MultiControlNetModel` (each one's residuals scaled by its weight, then summed);
- the residuals go into the UNet through its own `down_block_additional_residuals` and
  `mid_block_additional_residual`, as in diffusers' pipelines.

What is written here is the part of StableDiffusionControlNetPipeline's `__call__` the loop needs, in its words
(`control_image`, `controlnet_conditioning_scale`, `control_guidance_start`, `control_guidance_end`): the control
images as (rows, 3, h, w) in [0, 1], doubled for classifier-free guidance (guess mode off), and at each step every
unit's weight times whether the step lies in its [start, end] (diffusers' `controlnet_keep`).

One difference from the UNet: ControlNetModel's forward takes no `encoder_attention_mask`, so its cross-attention
also reads the padding of MiniLM's 24 tokens (the UNet masks it). A genkit-mini ControlNet is trained through the same
forward, so it learns with what it sees.
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from genkit.errors import GenkitError
from genkit.families.genkit_mini.model import GenkitMiniPipeline


class GenkitMiniControlNetPipeline(GenkitMiniPipeline):
    """GenkitMiniPipeline holding a ControlNet (or a list of them, held as a MultiControlNetModel), made of a loaded
    pipeline's components (genkit: genkit.families.shared.sharing; or diffusers' `from_pipe(pipe, controlnet=...)`);
    it takes `control_image` and the weights and bounds as diffusers' ControlNet pipelines do."""

    # the type hints are from_pipe's: it carries over a model component only where its class matches the hint
    def __init__(self, text_encoder, tokenizer, unet: UNet2DConditionModel, scheduler,
                 controlnet: ControlNetModel | list | MultiControlNetModel):
        super().__init__(text_encoder, tokenizer, unet, scheduler)
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        self.register_modules(controlnet=controlnet)


def prepare(pipe, control_image, rows: int, width: int, height: int, guidance: bool, scale, start, end):
    """(images, weights, starts, ends), one entry per ControlNet: its control images (rows, 3, h, w) in [0, 1], twice
    over with guidance. `control_image`: one ControlNet's image(s), or a list with one entry per ControlNet; an entry
    is one image for every row or a list of one per row (PIL images, fitted to width x height as A1111's "Crop and
    Resize", or (3, h, w) tensors in [0, 1] of that size)."""
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        raise GenkitError("needs a ControlNet: make the pipeline with GenkitMiniControlNetPipeline.from_pipe(pipe, "
                          "controlnet=...)", param="control_image")
    nets = len(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else 1
    per_net = list(control_image) if nets > 1 else [control_image]
    if len(per_net) != nets:
        raise GenkitError(f"got {len(per_net)} entries for {nets} ControlNets (one per ControlNet)",
                          param="control_image")

    def listed(value, name):
        values = list(value) if isinstance(value, (list, tuple)) else [value] * nets
        if len(values) != nets:
            raise GenkitError(f"got {len(values)} values for {nets} ControlNets", param=name)
        return [float(v) for v in values]

    images = [_rows(entry, rows, width, height).to(pipe._execution_device, pipe.unet.dtype) for entry in per_net]
    if guidance:  # the unconditional half reads the same control (diffusers' guess mode off)
        images = [torch.cat([image, image]) for image in images]
    return (images, listed(scale, "controlnet_conditioning_scale"), listed(start, "control_guidance_start"),
            listed(end, "control_guidance_end"))


def residuals(pipe, control, sample, t, embeds, step: int, steps: int) -> dict:
    """The UNet's extra arguments at step `step` of `steps`: the ControlNets' down and middle residuals, each
    ControlNet's scaled by its weight where the step lies in its [start, end], else by 0 (diffusers'
    `controlnet_keep`: the step i acts when i / steps >= start and (i + 1) / steps <= end)."""
    images, weights, starts, ends = control
    keep = [1.0 - float(step / steps < s or (step + 1) / steps > e) for s, e in zip(starts, ends)]
    scales = [w * k for w, k in zip(weights, keep)]
    several = isinstance(pipe.controlnet, MultiControlNetModel)
    down, mid = pipe.controlnet(sample, t, encoder_hidden_states=embeds,
                                controlnet_cond=images if several else images[0],
                                conditioning_scale=scales if several else scales[0], return_dict=False)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def _rows(entry, rows: int, width: int, height: int) -> torch.Tensor:
    """(rows, 3, height, width) in [0, 1] of one ControlNet's images: one for all rows, or one per row."""
    import numpy as np

    from genkit.controlnet import fit

    items = list(entry) if isinstance(entry, (list, tuple)) else [entry]
    if len(items) not in (1, rows):
        raise GenkitError(f"got {len(items)} control images for {rows} images; pass one for all, or one per image",
                          param="control_image")
    tensors = []
    for item in items:
        if torch.is_tensor(item):
            if tuple(item.shape) != (3, height, width):
                raise GenkitError(f"tensor has shape {tuple(item.shape)}; pass (3, {height}, {width}) in [0, 1] (or a "
                                  "PIL image, which is fitted)", param="control_image")
            tensors.append(item.float().cpu())
        else:
            pixels = np.asarray(fit(item, width, height), dtype=np.float32) / 255.0  # as diffusers' control images
            tensors.append(torch.from_numpy(pixels).permute(2, 0, 1))  # (3, height, width)
    stacked = torch.stack(tensors)
    return stacked.expand(rows, *stacked.shape[1:]).contiguous() if len(tensors) == 1 else stacked
