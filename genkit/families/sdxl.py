"""Stable Diffusion XL: a UNet that also reads pooled text and size/crop conditioning (text_time), two CLIPs.

An empty negative prompt is zeros (`force_zeros_for_empty_prompt`), not the encoded "": genkit passes
no negative for an all-empty batch, so its image is plain diffusers' default image.
"""

import torch

from genkit.families.base import Family


class StableDiffusionXL(Family):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    guidance_scale = 5.0
    num_inference_steps = 30

    def call_args(self, batch, generators, on_step) -> dict:
        args = super().call_args(batch, generators, on_step)
        if not any(args["negative_prompt"]):  # diffusers' own default: zeros (force_zeros_for_empty_prompt), not ""
            del args["negative_prompt"]  # (an empty and a non-empty negative never share a batch: Job.batch_key)
        return args

    def encode_captions(self, pipe, captions, device) -> dict:
        hidden, _, pooled, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        # micro-conditioning: original size, crop top-left, target size, all the training size (no crop)
        height, width = (side * int(pipe.vae_scale_factor) for side in noisy.shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=noisy.dtype, device=noisy.device)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids.expand(noisy.shape[0], -1)}
        return denoiser(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample


FAMILY = StableDiffusionXL()
