"""Qwen-Image (Alibaba's Qwen team): a 20B double-stream MMDiT read by Qwen2.5-VL (the last hidden states of the
chat-templated prompt, the template's system part dropped), flow matching on Wan's 16-channel causal 3D VAE, one
frame at a time.

Guidance is true classifier-free guidance with a negative prompt (the pipeline's `true_cfg_scale`, on above 1): the
combined prediction is rescaled to the conditional one's norm (diffusers' QwenImagePipeline). Its latents are
normalised by the VAE's per-channel mean and std (no scaling factor) and packed in 2x2 patches, (batch, tokens,
4 * channels), with a frame axis in between. Its pipelines always pass sigmas, as an array: flow-euler and flow-unipc
run them, flow-heun and DPM-Solver take none. Attention goes through diffusers' dispatcher; LoRA files load through
diffusers' QwenImageLoraLoaderMixin (transformer only); diffusers has img2img and inpainting (the editing models are
families/qwen_image_edit.py).

Its pipelines pad a batch's prompt embeddings to the batch's longest, with a mask; the masked padding changes the
attention's sums in their last bits, so a prompt's image would depend on its batch-mates. genkit's pipelines of this
family pad every prompt to the longest a prompt may be (512 tokens, masked), as Flux's and SD3's T5 always reads 512:
a 1024x1024 image's transformer sequence grows from about 4,100 tokens to 4,600.
"""

import functools

import torch

from genkit.families.base import FlowFamily, Kohya, load_diffusers, same_layer
from genkit.families.shared import sharing


class QwenImage(FlowFamily):
    name = "qwen-image"
    title = "Qwen-Image"
    pipeline_classes = ("QwenImagePipeline",)
    max_sequence_length = 512  # the pipeline's default: the prompt's own tokens (the template's head is dropped)
    guidance_scale = 4.0  # QwenImagePipeline's true_cfg_scale default
    num_inference_steps = 50
    dispatcher = True
    attention_masked = True  # prompts of different lengths in one call are masked
    # its original model's names are diffusers': ComfyUI reads diffusion_model.<layer> and lora_unet_<layer, _ for .>,
    # both of which diffusers' converter reads back
    kohya = Kohya("qwen_image", {"transformer": "lora_unet_"}, layer=same_layer, reader="QwenImageLoraLoaderMixin",
                  layouts=("kohya", "comfyui"))

    def load(self, source, *, dtype, use_safetensors, local):
        from diffusers import QwenImagePipeline

        return sharing(fixed_length(QwenImagePipeline), load_diffusers(source, dtype, use_safetensors, local))

    def edit_pipe(self, pipe, task: str):
        """diffusers' Qwen-Image img2img and inpainting pipelines, padding prompts to a fixed length as this one."""
        from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline

        self.check_edit(task)
        return sharing(fixed_length(QwenImageInpaintPipeline if task == "inpaint" else QwenImageImg2ImgPipeline), pipe)

    def samplers(self) -> tuple[str, ...]:
        return ("flow-euler", "flow-unipc")  # its pipelines pass sigmas, which flow-heun and DPM-Solver cannot take

    def latent_multiple(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * 2  # latents are packed in 2x2 patches

    def default_size(self, pipe) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def call_args(self, batch, generators, on_step) -> dict:
        """Its classifier-free guidance is `true_cfg_scale` (`guidance_scale` is a distilled model's input, which
        Qwen-Image's transformer does not take); at 1 or less no negative prompt is read."""
        args = super().call_args(batch, generators, on_step)
        args["true_cfg_scale"] = args.pop("guidance_scale")
        if args["true_cfg_scale"] <= 1:
            del args["negative_prompt"]
        return args

    def decode(self, pipe, latents, width, height) -> torch.Tensor:
        """Its latents come packed, (batch, tokens, 4 * channels), and normalised per channel: decoded as its
        pipeline decodes them."""
        frames = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)  # (batch, c, 1, h, w)
        mean, std = _moments(pipe.vae, frames)
        return pipe.vae.decode((frames * std + mean).to(pipe.vae.dtype), return_dict=False)[0][:, :, 0]

    def hires_latents(self, pipe, output, width, height, new_width, new_height) -> torch.Tensor:
        """Its pipeline returns packed latents: unpacked to (batch, c, h, w), which its img2img pipeline takes as they
        are (a tensor with the VAE's channel count), then upscaled as the others'."""
        latents = pipe._unpack_latents(output, height, width, pipe.vae_scale_factor)[:, :, 0]
        return super().hires_latents(pipe, latents, width, height, new_width, new_height)

    # -- ControlNet: diffusers' QwenImageControlNetModel (InstantX's) in QwenImageControlNetPipeline -----------------
    controlnet_classes = ("QwenImageControlNetModel",)
    controlnet_several = False  # diffusers' QwenImageMultiControlNetModel holds one (a union ControlNet) for now
    controlnet_fit = tuple((key, key) for key in ("in_channels", "patch_size", "joint_attention_dim",
                                                  "num_attention_heads", "attention_head_dim", "axes_dims_rope"))

    def control_pipe(self, pipe, controlnets):
        """diffusers' QwenImageControlNetPipeline, padding prompts to a fixed length as the family's other pipelines."""
        from diffusers import QwenImageControlNetPipeline

        return sharing(fixed_length(QwenImageControlNetPipeline), pipe, controlnet=controlnets[0])

    def control_args(self, pipe, batch, generators, units, images) -> dict:
        """Also the starting noise, drawn as QwenImagePipeline draws it: its ControlNet pipeline samples the control
        image's latents with the images' generators first (so without this weight 0 would not be the plain image)."""
        args = super().control_args(pipe, batch, generators, units, images)
        first = batch[0]
        args["latents"] = pipe.prepare_latents(len(batch), pipe.transformer.config.in_channels // 4, first.height,
                                               first.width, pipe.text_encoder.dtype, pipe._execution_device,
                                               generators)
        return args

    def new_controlnet(self, pipe) -> torch.nn.Module:
        """diffusers' `QwenImageControlNetModel.from_transformer` with its default depth (5 blocks) or the
        transformer's, where it has fewer."""
        from diffusers import QwenImageControlNetModel

        config = pipe.transformer.config
        return QwenImageControlNetModel.from_transformer(
            pipe.transformer, num_layers=min(5, config.num_layers), attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads)

    # -- training ----------------------------------------------------------------------------
    def encode_captions(self, pipe, captions, device) -> dict:
        """Each caption's hidden states, padded to the pipeline's cap with a mask (their lengths differ)."""
        hidden, mask = pipe.encode_prompt(list(captions), device=device, max_sequence_length=self.max_sequence_length)
        padded = hidden.new_zeros(len(captions), self.max_sequence_length, hidden.shape[-1])
        full = torch.zeros(len(captions), self.max_sequence_length, dtype=torch.long, device=hidden.device)
        padded[:, :hidden.shape[1]] = hidden
        full[:, :hidden.shape[1]] = 1 if mask is None else mask
        return {"encoder_hidden_states": padded, "encoder_hidden_states_mask": full}

    def encode_images(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """(batch, 2, c, h, w): the latent mean and std of each image as one frame (its VAE is a video VAE)."""
        dist = pipe.vae.encode(pixels.unsqueeze(2).to(pipe.vae.dtype)).latent_dist
        return torch.stack([dist.mean[:, :, 0], dist.std[:, :, 0]], dim=1).float()

    def latents(self, pipe, encoded, generators) -> torch.Tensor:
        """A draw per sample, normalised by the VAE's per-channel latent mean and std, as its pipelines do."""
        sample = encoded[:, 0] + encoded[:, 1] * torch.stack(
            [torch.randn(encoded.shape[2:], generator=g) for g in generators]).to(encoded.device)
        mean, std = _moments(pipe.vae, sample.unsqueeze(2))
        return ((sample.unsqueeze(2) - mean) / std)[:, :, 0]

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        batch, channels, height, width = noisy.shape  # latents, (batch, c, h, w)
        packed = pipe._pack_latents(noisy, batch, channels, height, width)  # (batch, h/2 * w/2, 4c)
        out = denoiser(hidden_states=packed, timestep=t / 1000, encoder_hidden_states=cond["encoder_hidden_states"],
                       encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
                       img_shapes=[[(1, height // 2, width // 2)]] * batch, return_dict=False)[0]
        scale = int(pipe.vae_scale_factor)
        return pipe._unpack_latents(out, height * scale, width * scale, scale)[:, :, 0]

    def lora_components(self, pipe) -> list[str]:
        return [self.denoiser_name]  # QwenImageLoraLoaderMixin loads the transformer's adapters alone


class OneStep:
    """A Qwen-Image pipeline that runs one step: its scheduler stretches the schedule to end at shift_terminal (0.02),
    which divides by zero for a single step (diffusers makes NaN); one step, sigma 1 to 0, has nothing to stretch."""

    def __call__(self, *args, **kwargs):
        if kwargs.get("num_inference_steps") == 1 and self.scheduler.config.get("shift_terminal"):
            self.scheduler = type(self.scheduler).from_config(self.scheduler.config, shift_terminal=None)
        return super().__call__(*args, **kwargs)


class FixedLength(OneStep):
    """A Qwen-Image pipeline whose prompt embeddings are padded, with a mask, to `max_sequence_length` (the longest its
    encode_prompt keeps) rather than to the batch's longest (and which runs one step)."""

    def encode_prompt(self, prompt=None, **kwargs):
        hidden, mask = super().encode_prompt(prompt, **kwargs)
        return pad_prompt(hidden, mask, kwargs.get("max_sequence_length", 512))


def pad_prompt(hidden: torch.Tensor, mask, length: int):
    """(hidden states, mask) padded to `length` tokens, the padding masked; a mask always (None read as all ones)."""
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    pad = max(length - hidden.shape[1], 0)  # (batch, tokens, width), (batch, tokens)
    return torch.nn.functional.pad(hidden, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))


@functools.lru_cache(maxsize=None)
def fixed_length(pipeline_class):
    """`pipeline_class` (a diffusers Qwen-Image pipeline) with FixedLength's prompt padding."""
    return type(pipeline_class.__name__, (FixedLength, pipeline_class), {})


def _moments(vae, like: torch.Tensor):
    """The VAE's per-channel latent mean and std, shaped (1, c, 1, 1, 1) like `like`'s channels."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    return mean, torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)


FAMILY = QwenImage()
