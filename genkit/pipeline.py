"""GenkitMiniPipeline: a frozen pretrained text encoder conditions a pixel-space UNet.

Imagen's recipe at toy scale (Saharia et al. 2022, https://arxiv.org/abs/2205.11487): the
text encoder (all-MiniLM-L6-v2) is pretrained and frozen; the decoder is a
`UNet2DConditionModel` that denoises RGB pixels directly and reads the token embeddings
through cross-attention. Classifier-free guidance (Ho & Salimans 2022) uses the
embedding of the empty prompt as the unconditional branch.

The call signature matches diffusers' text-to-image pipelines, so genkit's engine drives
this pipeline and any Stable Diffusion-family pipeline the same way.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

MAX_TOKENS = 24  # long enough for the longest two-object caption


def unet_config(sample_size: int = 32, channels=(32, 64, 128), cross_attention_levels: int = 1, head_dim: int = 16) -> dict:
    """The decoder's architecture: cross-attention only at the `cross_attention_levels` coarsest levels."""
    levels = len(channels)
    down = ["DownBlock2D"] * (levels - cross_attention_levels) + ["CrossAttnDownBlock2D"] * cross_attention_levels
    up = ["CrossAttnUpBlock2D"] * cross_attention_levels + ["UpBlock2D"] * (levels - cross_attention_levels)
    return dict(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=384,
        attention_head_dim=tuple(c // head_dim for c in channels),  # diffusers' name for the number of heads
        addition_embed_type="text",  # pooled text also joins the time embedding
        norm_num_groups=8,
    )


def encode_text(tokenizer, text_encoder, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (batch, tokens, 384) and the attention mask (batch, tokens)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    device = device or text_encoder.device
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
    return hidden, mask


def guided(prediction: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance, eq. 6 of https://arxiv.org/abs/2207.12598; input is [uncond; cond]."""
    uncond, cond = prediction.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class GenkitMiniPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, text_encoder, tokenizer, unet: UNet2DConditionModel, scheduler):
        super().__init__()
        self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(unet.config.block_out_channels) - 1)  # pixel space: the UNet's own factor

    def encode_prompt(self, prompts, negative_prompts, guidance: bool):
        device, dtype = self._execution_device, self.unet.dtype
        embeds, mask = encode_text(self.tokenizer, self.text_encoder, prompts, device)
        if guidance:
            neg, neg_mask = encode_text(self.tokenizer, self.text_encoder, negative_prompts, device)
            embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
        return embeds.to(dtype), mask

    def check_inputs(self, prompts, width, height, num_inference_steps):
        factor = self.vae_scale_factor
        for name, value in (("width", width), ("height", height)):
            if value % factor:
                raise ValueError(f"{name} must be a multiple of {factor}, got {value}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")

    def _step_kwargs(self, generator) -> dict:
        """Pass the per-image generators to schedulers that draw noise while stepping."""
        accepts = inspect.signature(self.scheduler.step).parameters
        return {"generator": generator} if "generator" in accepts else {}

    @torch.inference_mode()
    def __call__(
        self,
        prompt,
        negative_prompt=None,
        *,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        width: int | None = None,
        height: int | None = None,
        num_images_per_prompt: int = 1,
        generator=None,
        output_type: str = "pil",
        callback_on_step_end=None,
        return_dict: bool = True,
    ):
        # 1. Check inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else [
            n for n in negatives for _ in range(num_images_per_prompt)
        ]
        width = width or self.unet.config.sample_size
        height = height or self.unet.config.sample_size
        self.check_inputs(prompts, width, height, num_inference_steps)
        use_guidance = guidance_scale > 1.0

        # 2. Encode the prompt (and the negative or empty prompt, for guidance)
        embeds, mask = self.encode_prompt(prompts, negatives, use_guidance)

        # 3. Prepare timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)

        # 4. Prepare the starting noise, one generator per image
        shape = (len(prompts), self.unet.config.in_channels, height, width)  # (batch, channels, height, width)
        sample = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        sample = sample * self.scheduler.init_noise_sigma

        # 5. Denoising loop
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([sample] * 2) if use_guidance else sample
            model_input = self.scheduler.scale_model_input(model_input, t)
            prediction = self.unet(model_input, t, encoder_hidden_states=embeds, encoder_attention_mask=mask).sample
            if use_guidance:
                prediction = guided(prediction, guidance_scale)
            sample = self.scheduler.step(prediction, t, sample, **self._step_kwargs(generator)).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": sample})

        # 6. Convert to images
        images = (sample.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (batch, h, w, c)
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
