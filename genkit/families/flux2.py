"""Flux.2 [klein] (Black Forest Labs): Flux.2's double/single-stream transformer at 4B or 9B, read by Qwen3 (hidden
states 9, 18 and 27 of the chat-templated prompt side by side, every prompt padded to 512 tokens), flow matching on
Flux.2's 32-channel VAE, whose latents are patchified 2x2 into channels and normalised by its batch-norm statistics.

Generation and editing are one model: input images (references) join the noise's tokens in the sequence, each at its
own time coordinate, and the prompt says what to make of them ("make the circle blue", "the cat of image 1 on the
sofa of image 2"). So an input image with no strength is an instruction edit here; there is no img2img pipeline, and a
mask runs diffusers' Flux2KleinInpaintPipeline. The distilled models (klein 4B/9B) take no guidance (4 steps); the
base models use classifier-free guidance against the empty prompt (no negative prompt of the user's). Its pipeline
passes sigmas unless the sampler uses flow sigmas itself (DPM-Solver, UniPC): flow-heun alone cannot run. Attention
goes through diffusers' dispatcher; LoRA files load through diffusers' Flux2LoraLoaderMixin (transformer only).
"""

import functools
import re

import torch

from genkit.errors import GenkitError, term
from genkit.families.base import FlowFamily, Kohya, KohyaLayer
from genkit.families.flux import double_block_layer
from genkit.families.shared import sharing

MIN_SIDE, MAX_ASPECT = 64, 8  # the pipeline's own limits on an input image (Flux2ImageProcessor.check_image_input)
KOHYA_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
                "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
KOHYA_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer"}


def kohya_layer(layer: str) -> KohyaLayer | None:
    """A diffusers Flux.2 transformer layer as Black Forest Labs' model names it (kohya's `lora_unet_double_blocks_0_
    img_attn_qkv`, ComfyUI's and ai-toolkit's `diffusion_model.double_blocks.0.img_attn.qkv`): q, k and v fused; a
    single block's fused input and output as they are. The layers diffusers' kohya converter does not read back (the
    shared modulations, the final norm) have none here."""
    if match := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", layer):
        return double_block_layer(match, layer, KOHYA_DOUBLE)
    if match := re.fullmatch(r"single_transformer_blocks\.(\d+)\.attn\.(to_qkv_mlp_proj|to_out)", layer):
        return KohyaLayer(f"single_blocks.{match[1]}.{'linear1' if match[2] == 'to_qkv_mlp_proj' else 'linear2'}",
                          (layer,))
    return KohyaLayer(KOHYA_TOP[layer], (layer,)) if layer in KOHYA_TOP else None


class Flux2Klein(FlowFamily):
    name = "flux2-klein"
    title = "Flux.2 klein"  # Black Forest Labs writes FLUX.2 [klein]
    pipeline_classes = ("Flux2KleinPipeline",)
    max_sequence_length = 512  # every prompt is padded (and cut) to this, its chat template included
    negative_prompt = False  # its guidance steers from the empty prompt
    guidance_scale = 4.0  # Flux2KleinPipeline's defaults (the base models'; the distilled ones' are their presets')
    num_inference_steps = 50
    dispatcher = True
    edit_tasks = ("instruct", "inpaint")
    kohya = Kohya("flux2", {"transformer": "lora_unet_"}, layer=kohya_layer, reader="Flux2LoraLoaderMixin",
                  layouts=("kohya", "comfyui"), comfyui_keys=("lora_A", "lora_B"), comfyui_alphas=False)

    def samplers(self) -> tuple[str, ...]:
        return ("flow-euler", "flow-dpm++", "flow-unipc")  # flow-heun takes no sigmas, which its pipeline passes

    def latent_multiple(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * 2  # latents are patchified 2x2

    def default_size(self, pipe) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def prompt_limit(self, pipe):
        """The prompt's own share of the 512 tokens: the pipeline cuts its chat-templated text, which opens with the
        template's head (`<|im_start|>user\\n`)."""
        tokenizer, limit = super().prompt_limit(pipe)
        if tokenizer is None or not limit:
            return tokenizer, limit
        head = _chat(tokenizer, "\0").partition("\0")[0]
        return tokenizer, limit - len(tokenizer(head, add_special_tokens=False).input_ids)

    def check_job(self, job) -> None:
        from genkit import edit

        super().check_job(job)
        if job.task != "instruct":
            return
        for picture in edit.references(job.image):
            width, height = picture.pixels.size
            if min(width, height) < MIN_SIDE or max(width, height) > MAX_ASPECT * min(width, height):
                raise GenkitError(f"{picture.source} is {width}x{height}; {self.title} reads input images at least "
                                  f"{MIN_SIDE} pixels a side and at most {MAX_ASPECT}:1 (pass a larger "
                                  f"{term('image')})", param="image")

    def edit_pipe(self, pipe, task: str):
        """Its own pipeline reads input images (each prompt encoded alone); Flux2KleinInpaintPipeline inpaints."""
        from diffusers import Flux2KleinInpaintPipeline

        self.check_edit(task)
        return sharing(_each_prompt() if task == "instruct" else Flux2KleinInpaintPipeline, pipe)

    def decode(self, pipe, latents, width, height) -> torch.Tensor:
        """Its latents come as tokens, (batch, h/2 * w/2, 4c), normalised: as its pipeline decodes them."""
        scale = int(pipe.vae_scale_factor) * 2
        grid = latents.new_empty(len(latents), 1, height // scale, width // scale)
        patched = pipe._unpack_latents_with_ids(latents, pipe._prepare_latent_ids(grid), height // scale,
                                                width // scale)  # (batch, 4c, h/2, w/2)
        return pipe.vae.decode(pipe._unpatchify_latents(_denormalise(pipe.vae, patched)).to(pipe.vae.dtype),
                               return_dict=False)[0]

    # -- training ----------------------------------------------------------------------------
    def encode_captions(self, pipe, captions, device) -> dict:
        hidden, text_ids = pipe.encode_prompt(list(captions), device=device,
                                              max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": hidden, "txt_ids": text_ids}

    def latents(self, pipe, encoded, generators) -> torch.Tensor:
        """A draw per sample, patchified 2x2 and normalised by the VAE's batch-norm statistics, as its pipeline's
        latents are: (batch, 4c, h/2, w/2)."""
        sample = encoded[:, 0] + encoded[:, 1] * torch.stack(
            [torch.randn(encoded.shape[2:], generator=g) for g in generators]).to(encoded.device)
        patched = pipe._patchify_latents(sample)
        mean, std = _batch_norm(pipe.vae, patched)
        return (patched - mean) / std

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        batch, channels, height, width = noisy.shape  # patchified latents, (batch, 4c, h/2, w/2)
        out = denoiser(hidden_states=pipe._pack_latents(noisy), timestep=t / 1000, guidance=None,
                       encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=cond["txt_ids"],
                       img_ids=pipe._prepare_latent_ids(noisy).to(noisy.device), return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(batch, channels, height, width)  # tokens back to the grid

    def lora_components(self, pipe) -> list[str]:
        return [self.denoiser_name]  # Flux2LoraLoaderMixin loads the transformer's adapters alone


def _batch_norm(vae, like: torch.Tensor):
    """The VAE's latent batch-norm mean and std, (1, 4c, 1, 1), in `like`'s device and dtype."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std.to(like.device, like.dtype)


def _denormalise(vae, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _batch_norm(vae, latents)
    return latents * std + mean


def _chat(tokenizer, prompt: str) -> str:
    """`prompt` as Flux2KleinPipeline gives it to Qwen3: in the tokenizer's chat template, thinking disabled."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


@functools.lru_cache(maxsize=1)
def _each_prompt():
    from diffusers import Flux2KleinPipeline

    class EachPrompt(Flux2KleinPipeline):
        """Flux2KleinPipeline with each prompt encoded alone: a prompt's embedding never depends on its batch-mates
        (the engine's rows_apart stands aside for edits, whose text encoders may read the images too)."""

        def encode_prompt(self, prompt, **kwargs):
            if not isinstance(prompt, list) or len(prompt) < 2 or kwargs.get("prompt_embeds") is not None:
                return super().encode_prompt(prompt, **kwargs)
            parts = [super(EachPrompt, self).encode_prompt([text], **kwargs) for text in prompt]
            return torch.cat([hidden for hidden, _ in parts]), torch.cat([ids for _, ids in parts])

    return EachPrompt


FAMILY = Flux2Klein()
