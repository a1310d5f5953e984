"""Flux.1: a double/single-stream transformer on packed 2x2 latent patches, CLIP (pooled) + T5, flow matching.

Its `guidance_scale` is a distilled input (dev: 3.5; schnell ignores it), not classifier-free
guidance, so Flux takes no negative prompt here. Attention goes through diffusers' dispatcher.
"""

import torch

from genkit.families.base import FlowFamily


class Flux(FlowFamily):
    name = "flux"
    title = "Flux.1"
    pipeline_classes = ("FluxPipeline",)
    prompt_tokenizer = "tokenizer_2"  # T5: the sequence the transformer attends to
    max_sequence_length = 512  # the pipeline's max_sequence_length default
    negative_prompt = False
    dispatcher = True
    guidance_scale = 3.5
    num_inference_steps = 28

    def samplers(self) -> tuple[str, ...]:
        return ("flow-euler", "flow-dpm++", "flow-unipc")  # FluxPipeline passes sigmas, which flow-heun cannot take

    def latent_multiple(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * 2  # latents are packed in 2x2 patches

    def default_size(self, pipe) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def decode(self, pipe, latents, width, height) -> torch.Tensor:
        """Its latents come packed in 2x2 patches, (batch, tokens, 4 * channels): unpacked first."""
        return super().decode(pipe, pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor), width, height)

    def encode_captions(self, pipe, captions, device) -> dict:
        hidden, pooled, _ = pipe.encode_prompt(captions, None, device=device, num_images_per_prompt=1)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        batch, channels, height, width = noisy.shape  # latents, (batch, 16, h, w)
        packed = pipe._pack_latents(noisy, batch, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        hidden = cond["encoder_hidden_states"]
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if denoiser.config.guidance_embeds:  # distilled guidance: train at the default scale, as diffusers' script does
            guidance = torch.full((batch,), self.guidance_scale, device=noisy.device, dtype=noisy.dtype)
        out = denoiser(hidden_states=packed, timestep=t / 1000, guidance=guidance,
                       pooled_projections=cond["pooled_projections"], encoder_hidden_states=hidden, txt_ids=text_ids,
                       img_ids=image_ids).sample
        scale = int(pipe.vae_scale_factor)
        return pipe._unpack_latents(out, height * scale, width * scale, scale)


FAMILY = Flux()
