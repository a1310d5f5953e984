"""Stable Diffusion XL: a UNet that also reads pooled text and size/crop conditioning (text_time), two CLIPs.

An empty negative prompt is zeros (`force_zeros_for_empty_prompt`), not the encoded "": genkit passes
no negative for an all-empty batch, so its image is plain diffusers' default image.
"""

import torch

from genkit.families.base import Kohya
from genkit.families.sd import UNET, StableDiffusion


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    guidance_scale = 5.0
    num_inference_steps = 30
    empty_negative_is_zeros = True  # diffusers' own default (force_zeros_for_empty_prompt), not ""
    controlnet_pipeline = "StableDiffusionXLControlNetPipeline"
    text_encoder_lora = False
    kohya = Kohya("sdxl_base_v1-0", {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"})

    def single_file_kind(self, keys) -> str | None:
        """Stability's SDXL layout: the UNet with its size embedding (label_emb), CLIP-L and OpenCLIP-G under
        conditioner.embedders.0 and .1 (the refiner, with OpenCLIP alone, is not this family's)."""
        text = any(key.startswith("conditioner.embedders.1.model.") for key in keys)
        return "checkpoint" if UNET in keys and "model.diffusion_model.label_emb.0.0.weight" in keys and text else None

    def single_file_base(self, keys) -> str | None:
        return "sdxl"

    def vae_upcast(self, pipe) -> bool:
        """SDXL's VAE overflows in fp16: its pipelines decode in fp32 unless the VAE says it is fp16-safe (its config's
        force_upcast false, as madebyollin's sdxl-vae-fp16-fix), as A1111's --no-half-vae."""
        return pipe.vae.dtype == torch.float16 and bool(pipe.vae.config.force_upcast)

    def decode(self, pipe, latents, width, height) -> torch.Tensor:
        config = pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return super().decode(pipe, latents, width, height)
        mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents.device, latents.dtype) for v in (mean, std))
        return pipe.vae.decode((latents * std / config.scaling_factor + mean).to(pipe.vae.dtype), return_dict=False)[0]

    def chunk_embeds(self, pipe, batch, chunks: int) -> dict:
        """Both CLIPs' penultimate states side by side, chunk by chunk; pooled text from the second's first chunk."""
        from genkit.families import clip_chunks

        def encode(texts):
            encoded = [clip_chunks.encode(encoder, tokenizer, texts, chunks, penultimate=True)
                       for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer),
                                                  (pipe.text_encoder_2, pipe.tokenizer_2)) if encoder is not None]
            dtype = pipe.text_encoder_2.dtype
            return torch.cat([states for states, _ in encoded], dim=-1).to(dtype), encoded[-1][1].to(dtype)

        embeds, pooled = encode([job.prompt for job in batch])
        args = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if any(job.negative_prompt for job in batch):  # else diffusers' zeros, as for a short prompt
            negative, negative_pooled = encode([job.negative_prompt for job in batch])
            args.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return args

    def weighted_args(self, pipe, batch, chunks: int, args: dict) -> dict:
        """Both CLIPs' weighted penultimate states side by side; pooled text from the second's first chunk, unweighted;
        an all-empty negative left to diffusers' zeros, as for an unweighted prompt."""
        from genkit.families import clip_weights

        args = {k: v for k, v in args.items() if k not in ("prompt", "negative_prompt")}
        pairs = [(e, t) for e, t in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
                 if e is not None]

        def encode(texts):
            states = [clip_weights.encode(e, t, texts, chunks, penultimate=True) for e, t in pairs]
            dtype = pipe.text_encoder_2.dtype
            return (torch.cat(states, dim=-1).to(dtype),
                    clip_weights.pooled(pipe.text_encoder_2, pipe.tokenizer_2, texts).to(dtype))

        embeds, pooled = encode([job.prompt for job in batch])
        args.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if any(job.negative_prompt for job in batch):
            negative, negative_pooled = encode([job.negative_prompt for job in batch])
            args.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
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
