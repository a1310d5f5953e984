"""What every model family answers for the engine, the trainers and the server.

Today's text-to-image models differ in more than weights: a UNet or a transformer denoiser, one to
three text encoders, epsilon / v / flow-matching targets, true or distilled guidance, size multiples
of 8 to 32, which attention hook they obey, and how their LoRA files are written. A `Family` holds
those answers for one kind of diffusers pipeline; `genkit.families` finds the family of a loaded
pipeline from its class name. The defaults here are Stable Diffusion 1.x's; each family module
overrides what differs and nothing else.
"""

from __future__ import annotations

import contextlib
from enum import Enum

import torch

from genkit.attention import Attention
from genkit.errors import GenkitError, term


class Target(str, Enum):
    """What the denoiser is trained to predict."""

    EPSILON = "epsilon"  # the added noise (DDPM, Ho et al. 2020)
    V_PREDICTION = "v_prediction"  # v = alpha * noise - sigma * x0 (Salimans & Ho 2022)
    SAMPLE = "sample"
    FLOW = "flow"  # rectified flow: noise - x0 (Liu et al. 2022; SD3, Esser et al. 2024)


UNET_SAMPLERS = ("ddim", "euler", "euler-a", "dpm++", "unipc", "ddpm")
FLOW_SAMPLERS = ("flow-euler", "flow-heun", "flow-dpm++", "flow-unipc")


class Family:
    """Stable Diffusion 1.x/2.x; the base every other family changes."""

    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_classes: tuple[str, ...] = ("StableDiffusionPipeline",)
    denoiser_name = "unet"  # the pipeline attribute that holds the denoiser
    latent = True  # a VAE maps pixels to latents (genkit-mini works in pixels)
    flow = False  # flow-matching sampling (its own sampler names)
    negative_prompt = True  # the call takes a negative prompt (for classifier-free guidance)
    guidance_scale = 7.0  # default --guidance
    num_inference_steps = 25  # default --steps
    scheduler = "default"  # default sampler: the model's own
    size_multiple: int | None = None  # None: the VAE's factor (8)
    lora_layout = "diffusers"  # "diffusers" (lora.down/up, what SD loaders expect) or "peft" (lora_A/B)
    edit_tasks: tuple[str, ...] = ("img2img", "inpaint")  # diffusers has these pipelines for the family

    # -- what the engine asks ---------------------------------------------------------------
    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_name)

    prompt_tokenizer = "tokenizer"  # the tokenizer of the text the denoiser mostly reads
    max_sequence_length: int | None = None  # the pipeline's own cap on it (None: the tokenizer's model_max_length)

    def prompt_limit(self, pipe):
        """(tokenizer, tokens it keeps) of the main text conditioning; a longer prompt is cut there."""
        tokenizer, limit = getattr(pipe, self.prompt_tokenizer, None), self.max_sequence_length
        if tokenizer is None:  # e.g. SD3 loaded without its T5: the CLIP tokenizer's own length
            tokenizer, limit = getattr(pipe, "tokenizer", None), None
        if tokenizer is None:
            return None, None
        limit = limit or tokenizer.model_max_length
        return tokenizer, (limit if limit and limit < 100_000 else None)

    prompt_chunks = True  # CLIP text: a prompt past 75 tokens can be read in chunks (genkit.families.clip_chunks)

    def chunks(self, pipe, text: str) -> int:
        """75-token chunks `text` takes (1 when it fits); asked only of families with `prompt_chunks`."""
        from genkit.families import clip_chunks

        return clip_chunks.count(self.chunk_tokenizer(pipe), text)

    def chunk_tokenizer(self, pipe):
        """The CLIP tokenizer that splits prompts into chunks (SDXL's two share one vocabulary)."""
        return getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)

    def chunked_args(self, pipe, batch, chunks: int) -> dict:
        """The call's text as embeddings of `chunks` chunks each (replacing prompt / negative_prompt)."""
        from genkit.families import clip_chunks

        def encode(texts):
            return clip_chunks.encode(pipe.text_encoder, pipe.tokenizer, texts, chunks)[0].to(pipe.text_encoder.dtype)

        return {"prompt_embeds": encode([job.prompt for job in batch]),
                "negative_prompt_embeds": encode([job.negative_prompt for job in batch])}

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        return [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(pipe, n, None) is not None]

    def multiple(self, pipe) -> int:
        """Width and height must be multiples of this."""
        return self.size_multiple or int(getattr(pipe, "vae_scale_factor", 8))

    def default_size(self, pipe) -> int:
        size = self.denoiser(pipe).config.sample_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(size) * (int(getattr(pipe, "vae_scale_factor", 8)) * self.patch(pipe) if self.latent else 1)

    def patch(self, pipe) -> int:
        """Latent pixels per denoiser token side (transformers patchify; a UNet sees every latent pixel)."""
        return 1

    def defaults(self, pipe) -> dict:
        size = self.default_size(pipe)
        return {"width": size, "height": size, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "scheduler": self.scheduler, "negative_prompt": ""}

    def samplers(self) -> tuple[str, ...]:
        return FLOW_SAMPLERS if self.flow else UNET_SAMPLERS

    def call_args(self, batch, generators, on_step) -> dict:
        """The diffusers pipeline call for one batch of jobs (all sharing steps, guidance, size, sampler)."""
        first = batch[0]
        args = dict(prompt=[job.prompt for job in batch], num_inference_steps=first.num_inference_steps,
                    guidance_scale=first.guidance_scale, width=first.width, height=first.height,
                    generator=generators, callback_on_step_end=on_step)
        if self.negative_prompt:
            args["negative_prompt"] = [job.negative_prompt for job in batch]
        return args

    def check_job(self, job) -> None:
        """Refuse settings this family cannot honour (before any work)."""
        if job.negative_prompt and not self.negative_prompt:
            raise GenkitError(f"negative_prompt: {self.title} models take no negative prompt (drop {term('negative_prompt')})")

    # -- editing ----------------------------------------------------------------------------
    def edit_pipe(self, pipe, task: str):
        """The pipeline that runs `task` ("img2img" or "inpaint"): diffusers' own for the family, made with
        `from_pipe`, so it shares `pipe`'s loaded components (weights, LoRAs, attention) without a second load."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        self.check_edit(task)
        auto = AutoPipelineForInpainting if task == "inpaint" else AutoPipelineForImage2Image
        return auto.from_pipe(pipe)

    def check_edit(self, task: str) -> None:
        if task not in self.edit_tasks:
            from genkit import families

            have = [family.name for family in families.all_families() if task in family.edit_tasks]
            what = {"img2img": "image-to-image (--image)", "inpaint": "inpainting (--mask / --outpaint)"}[task]
            raise GenkitError(f"{what}: {self.title} models have no {task} pipeline in diffusers (families with it: "
                              f"{', '.join(have)}); drop the input image or use one of those")

    # -- attention --------------------------------------------------------------------------
    def apply_attention(self, pipe, backend: Attention) -> None:
        """UNet families: diffusers' attention processors on every model that has them."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if backend is Attention.XFORMERS:
            pipe.enable_xformers_memory_efficient_attention()
            return
        for module in pipe.components.values():
            if not hasattr(module, "set_attn_processor"):
                continue
            if backend is Attention.SLICED and hasattr(module, "set_attention_slice"):
                module.set_attention_slice("auto")
            else:
                module.set_attn_processor(AttnProcessor() if backend is Attention.MATH else AttnProcessor2_0())

    def attention_context(self, backend: Attention):
        """A context the pipeline call runs in (transformer families choose SDPA's kernel here)."""
        return contextlib.nullcontext()

    # -- training ---------------------------------------------------------------------------
    def target(self, pipe) -> Target:
        return Target(pipe.scheduler.config.get("prediction_type", "epsilon"))

    def encode_captions(self, pipe, captions: list[str], device) -> dict[str, torch.Tensor]:
        """What the denoiser reads of each caption, every tensor with the batch first (cached by the trainer)."""
        hidden, _ = pipe.encode_prompt(captions, device, 1, False)
        return {"encoder_hidden_states": hidden}

    def encode_images(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """(batch, 2, c, h, w): the VAE's latent mean and std (sampled per step by `latents`)."""
        dist = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist
        return torch.stack([dist.mean, dist.std], dim=1).float()

    def latents(self, pipe, encoded: torch.Tensor, generators) -> torch.Tensor:
        """Scaled latents the denoiser works on, one draw per sample from its own generator."""
        mean, std = encoded[:, 0], encoded[:, 1]
        draws = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators]).to(mean.device)
        config = pipe.vae.config
        return (mean + std * draws - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor

    def noisy(self, scheduler, clean, noise, generators):
        """(noisy input, timestep as the denoiser takes it, regression target) for one batch."""
        steps = scheduler.config.num_train_timesteps
        t = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators]).to(clean.device)
        target = self.target_of(scheduler, clean, noise, t)
        return scheduler.add_noise(clean, noise, t), t, target

    def target_of(self, scheduler, clean, noise, t):
        prediction = Target(scheduler.config.prediction_type)
        if prediction is Target.EPSILON:
            return noise
        if prediction is Target.V_PREDICTION:
            return scheduler.get_velocity(clean, noise, t)
        return clean

    def training_scheduler(self, pipe):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def forward(self, pipe, denoiser, noisy, t, cond: dict) -> torch.Tensor:
        """The denoiser's prediction for a training batch."""
        return denoiser(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    # -- LoRA files -------------------------------------------------------------------------
    def save_lora(self, pipe, folder, layers: dict, metadata: dict, weight_name: str) -> None:
        """Write the adapters as diffusers' `<Pipeline>.save_lora_weights` does for this pipeline class."""
        kwargs = {f"{self.denoiser_name}_lora_layers": layers[self.denoiser_name],
                  f"{self.denoiser_name}_lora_adapter_metadata": metadata[self.denoiser_name]}
        if "text_encoder" in layers:
            kwargs.update(text_encoder_lora_layers=layers["text_encoder"],
                          text_encoder_lora_adapter_metadata=metadata["text_encoder"])
        type(pipe).save_lora_weights(folder, safe_serialization=True, weight_name=weight_name, **kwargs)


class TransformerFamily(Family):
    """Transformer denoisers (DiT / MMDiT): SDPA inside their own processors, patchified latents."""

    denoiser_name = "transformer"
    prompt_chunks = False  # T5 / Gemma text of hundreds of tokens: read as the pipeline reads it
    lora_layout = "peft"  # diffusers' SD3/Flux/SANA training scripts save peft's lora_A/lora_B keys

    def patch(self, pipe) -> int:
        return int(getattr(self.denoiser(pipe).config, "patch_size", 1) or 1)

    def multiple(self, pipe) -> int:
        """A latent side must hold whole patches (PixArt's own check says 8 and then crashes on 24 or 40)."""
        return int(pipe.vae_scale_factor) * self.patch(pipe)

    def apply_attention(self, pipe, backend: Attention) -> None:
        """Their processors are their own (joint, linear, rotary): never replaced; SDPA's kernel is chosen per call."""
        if backend is Attention.SLICED:
            raise GenkitError(f"attention: sliced attention is for UNet models; {self.title} computes attention in "
                              f"its own processors (use {term('attention')} sdpa or math)")
        if backend is Attention.XFORMERS:
            denoiser = self.denoiser(pipe)
            if hasattr(denoiser, "set_attention_backend") and self.dispatcher:
                denoiser.set_attention_backend("xformers")
            else:
                pipe.enable_xformers_memory_efficient_attention()

    dispatcher = False  # the model calls diffusers' dispatch_attention_fn (set_attention_backend reaches it)

    def attention_context(self, backend: Attention):
        if backend is Attention.MATH:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()


class FlowFamily(TransformerFamily):
    """Flow-matching transformers: x_t = (1 - s) x0 + s noise, target noise - x0, timestep s * 1000."""

    flow = True
    scheduler = "default"

    def target(self, pipe) -> Target:
        return Target.FLOW

    def training_scheduler(self, pipe):
        return None  # sigmas are drawn directly (logit-normal, SD3 paper section 3.1)

    def noisy(self, scheduler, clean, noise, generators):
        # logit-normal sigma (Esser et al. 2024, eq. 19 with m=0, s=1): more weight to the middle of the path
        sigma = torch.sigmoid(torch.cat([torch.randn((1,), generator=g) for g in generators])).to(clean.device)
        s = sigma.view(-1, *([1] * (clean.dim() - 1)))
        return (1 - s) * clean + s * noise, sigma * 1000, noise - clean
