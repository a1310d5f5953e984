"""Chroma: Flux.1-schnell's double/single-stream transformer with its modulation replaced by a small approximator
network, read by T5 alone, flow matching with true classifier-free guidance (a negative prompt).

Its latents are packed in 2x2 patches as Flux's, its pipeline passes sigmas (so no flow-heun and, unlike Flux's, no DPM-Solver), its attention
goes through diffusers' dispatcher and its LoRA files load through Flux's loader. diffusers' auto-pipelines do
not map Chroma to its image-to-image pipeline, so it is named here. Inpainting is not offered: diffusers
0.42's ChromaInpaintPipeline reads `transformer.config.guidance_embeds`, which Chroma's transformer does not
have, and fails on every call (tests/test_edit_engine.py shows the refusal).
"""

import dataclasses

import torch

from genkit.families.base import original_key
from genkit.families.flux import Flux


class Chroma(Flux):
    name = "chroma"
    title = "Chroma"
    pipeline_classes = ("ChromaPipeline",)
    prompt_tokenizer = "tokenizer"  # T5, its only text encoder
    negative_prompt = True  # true CFG, unlike Flux.1's distilled guidance
    guidance_scale = 5.0  # ChromaPipeline's defaults
    num_inference_steps = 35
    edit_tasks = ("img2img",)
    attention_masked = True  # its calls mask T5's padding (flash-attn and sage take no mask: their probes say so)
    controlnet_classes = ()  # diffusers has no Chroma ControlNet (Flux's do not fit its transformer)
    kohya = dataclasses.replace(Flux.kohya, base_version="chroma")  # its blocks carry Flux's names (no modulation)

    def single_file_kind(self, keys) -> str | None:
        """Flux's layout with the approximator (distilled_guidance_layer) in place of the modulation inputs."""
        return "denoiser" if original_key(keys, "distilled_guidance_layer.in_proj.bias") else None

    def single_file_base(self, keys) -> str | None:
        return "chroma"

    def single_file_state(self, file):
        return None  # diffusers' converter (Chroma1's 3072-wide transformer)

    def samplers(self) -> tuple[str, ...]:
        return ("flow-euler", "flow-unipc")  # its pipeline passes sigmas, which flow-heun and DPM-Solver cannot take

    def edit_pipe(self, pipe, task: str):
        from diffusers import ChromaImg2ImgPipeline

        self.check_edit(task)
        return ChromaImg2ImgPipeline.from_pipe(pipe)

    def encode_captions(self, pipe, captions, device) -> dict:
        hidden, _, mask, _, _, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        batch, channels, height, width = noisy.shape  # latents, (batch, c, h, w)
        packed = pipe._pack_latents(noisy, batch, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        hidden = cond["encoder_hidden_states"]
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        mask = pipe._prepare_attention_mask(batch, packed.shape[1], noisy.dtype, cond["encoder_attention_mask"])
        out = denoiser(hidden_states=packed, timestep=t / 1000, encoder_hidden_states=hidden, txt_ids=text_ids,
                       img_ids=image_ids, attention_mask=mask).sample
        scale = int(pipe.vae_scale_factor)
        return pipe._unpack_latents(out, height * scale, width * scale, scale)


FAMILY = Chroma()
