"""GenkitMiniPipeline: a frozen pretrained text encoder conditions a pixel-space UNet.

Imagen's recipe at toy scale (Saharia et al. 2022, https://arxiv.org/abs/2205.11487): the
text encoder (all-MiniLM-L6-v2) is pretrained and frozen; the decoder is a
`UNet2DConditionModel` that denoises RGB pixels directly and reads the token embeddings
through cross-attention. Classifier-free guidance (Ho & Salimans 2022) uses the
embedding of the empty prompt as the unconditional branch.

The call signature matches diffusers' text-to-image pipelines, so genkit's engine drives
this pipeline and any Stable Diffusion-family pipeline the same way; with `image` (and
`mask_image`) it takes diffusers' img2img and inpaint arguments, named as
`StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline` name them:

- img2img is SDEdit (Meng et al. 2021, https://arxiv.org/abs/2108.01073): of the
  `num_inference_steps` timesteps the last `int(num_inference_steps * strength)` are kept (diffusers'
  `get_timesteps`), the input is noised to the first kept one with each image's own generator
  (`scheduler.add_noise`), and the sample is denoised from there;
- inpainting works in pixel space, so the known (black) region is re-imposed after every step
  (RePaint, Lugmayr et al. 2022, https://arxiv.org/abs/2201.09865): those pixels of the sample are
  replaced by the input noised to the next timestep with a new draw from each image's generator
  (`inpaint_noise`, see `genkit.edit`), and after the last step by the input itself, so they equal
  the input exactly. How these choices were measured: docs/edit-mini.md.

Each row's pixels depend only on its prompt, input, mask, strength and generator: noise is drawn
with `randn_tensor(shape, generator=[...])`, one generator per row.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from genkit import edit
from genkit.errors import GenkitError

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
        # inpainting: how the known region is noised after each step (genkit.edit.INPAINT_NOISE) and how many
        # passes each step makes (RePaint's resampling); measured in docs/edit-mini.md
        self.inpaint_noise = edit.INPAINT_NOISE[0]
        self.inpaint_resample = edit.INPAINT_RESAMPLE

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

    def _noised(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`clean` noised to `timesteps` as the scheduler samples (flow-matching schedulers call it scale_noise)."""
        if hasattr(self.scheduler, "add_noise"):
            return self.scheduler.add_noise(clean, noise, timesteps)
        return self.scheduler.scale_noise(clean, timesteps, noise)

    def _renoised(self, sample, t_from, t_to, shape, generator) -> torch.Tensor:
        """A draw of q(x_{t_to} | x_{t_from}) for t_to > t_from: forward diffusion between two noise levels, in
        the scheduler's parametrisation (variance-preserving samples, or x0 + sigma * noise for Euler types)."""
        cumprod = self.scheduler.alphas_cumprod.double()
        a_from, a_to = cumprod[int(t_from)], cumprod[int(t_to)]
        eps = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        if float(self.scheduler.init_noise_sigma) > 1:  # Euler-type: x = x0 + sigma * noise
            added = ((1 - a_to) / a_to - (1 - a_from) / a_from).clamp(min=0).sqrt()
            return sample + float(added) * eps
        ratio = a_to / a_from
        return float(ratio.sqrt()) * sample + float((1 - ratio).clamp(min=0).sqrt()) * eps

    @torch.inference_mode()
    def __call__(
        self,
        prompt,
        negative_prompt=None,
        *,
        image=None,
        mask_image=None,
        strength: float | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        width: int | None = None,
        height: int | None = None,
        num_images_per_prompt: int = 1,
        generator=None,
        output_type: str = "pil",
        callback_on_step_end=None,
        return_dict: bool = True,
        control_image=None,  # ControlNet (a GenkitMiniControlNetPipeline's; genkit.families.genkit_mini.control)
        controlnet_conditioning_scale=1.0,
        control_guidance_start=0.0,
        control_guidance_end=1.0,
    ):
        # 1. Check inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else [
            n for n in negatives for _ in range(num_images_per_prompt)
        ]
        rows = len(prompts)
        init, repaint = None, None  # edits: the input (rows, 3, h, w) in [-1, 1]; True where the mask repaints
        if image is None:
            if mask_image is not None:
                raise GenkitError("needs an image to inpaint (pass image= as well)", param="mask_image")
            if strength is not None:
                raise GenkitError(f"{strength} applies only to an input image (pass image=, or drop strength)",
                                  param="strength")
        else:
            strength = edit.check_strength(edit.default_strength(mask_image is not None) if strength is None
                                           else strength)
            init, repaint, width, height = self.prepare_edit(image, mask_image, rows, width, height)
        width = width or self.unet.config.sample_size
        height = height or self.unet.config.sample_size
        self.check_inputs(prompts, width, height, num_inference_steps)
        use_guidance = guidance_scale > 1.0

        # 2. Encode the prompt (and the negative or empty prompt, for guidance); the control images, if any
        embeds, mask = self.encode_prompt(prompts, negatives, use_guidance)
        control = None if control_image is None else _control().prepare(
            self, control_image, rows, width, height, use_guidance, controlnet_conditioning_scale,
            control_guidance_start, control_guidance_end)

        # 3. Prepare timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        timesteps = self.scheduler.timesteps
        if init is not None:
            timesteps = edit.strength_timesteps(self.scheduler, num_inference_steps, strength)

        # 4. Prepare the starting noise, one generator per image
        shape = (len(prompts), self.unet.config.in_channels, height, width)  # (batch, channels, height, width)
        sample = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        if init is None:
            sample = sample * self.scheduler.init_noise_sigma
        else:  # SDEdit: the input noised to the first kept timestep, with each image's own noise
            init = init.to(self._execution_device)
            repaint = repaint.to(self._execution_device) if repaint is not None else None
            noise, init_model = sample, init.to(self.unet.dtype)
            sample = self._noised(init_model, noise, timesteps[:1].repeat(rows))

        # 5. Denoising loop
        last = len(timesteps) - 1
        for i, t in enumerate(self.progress_bar(timesteps)):
            passes = self.inpaint_resample if repaint is not None and i < last else 1
            for u in range(passes):
                if u < passes - 1:  # RePaint's resampling: remember the scheduler to step from t again
                    state = copy.deepcopy(self.scheduler.__dict__)
                model_input = torch.cat([sample] * 2) if use_guidance else sample
                model_input = self.scheduler.scale_model_input(model_input, t)
                residuals = {} if control is None else _control().residuals(self, control, model_input, t, embeds, i,
                                                                             len(timesteps))
                prediction = self.unet(model_input, t, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                       **residuals).sample
                if use_guidance:
                    prediction = guided(prediction, guidance_scale)
                stepped = self.scheduler.step(prediction, t, sample, **self._step_kwargs(generator)).prev_sample
                if repaint is not None and i < last and self.inpaint_noise != "none":
                    if self.inpaint_noise == "fresh":  # RePaint's q(x_t | x_0): new noise from each image's generator
                        noise = randn_tensor(shape, generator=generator, device=self._execution_device,
                                             dtype=self.unet.dtype)
                    known = self._noised(init_model, noise, timesteps[i + 1 : i + 2].repeat(rows))
                    stepped = torch.where(repaint, stepped, known)
                if u == passes - 1:
                    sample = stepped
                    continue
                self.scheduler.__dict__.update(state)  # back to t: noise the sample up again, then step anew
                sample = self._renoised(stepped, timesteps[i + 1], t, shape, generator)
                if self.inpaint_noise != "none":
                    if self.inpaint_noise == "fresh":
                        noise = randn_tensor(shape, generator=generator, device=self._execution_device,
                                             dtype=self.unet.dtype)
                    sample = torch.where(repaint, sample, self._noised(init_model, noise, timesteps[i : i + 1].repeat(rows)))
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": sample})

        # 6. Convert to images (inpainting: the kept region is the input itself, in float32)
        if repaint is not None:
            sample = torch.where(repaint, sample.float(), init)
        images = (sample.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (batch, h, w, c)
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    # -- edit inputs ------------------------------------------------------------------------------
    def prepare_edit(self, image, mask_image, rows: int, width, height):
        """(input (rows, 3, h, w) float32 in [-1, 1], repaint mask (rows, 1, h, w) bool or None, width, height).

        `image` and `mask_image` are each one item for every row or one per row: PIL images, numpy
        arrays or paths (read by `genkit.images`), or tensors (batch, 3, h, w) in [-1, 1] and (batch, 1, h, w)
        in [0, 1]. PIL inputs are fitted to width x height by `genkit.images.fit_to_size` (without them,
        the first image's size rounded down to the size factor); tensors must already have that size.
        A mask must have its image's size; it repaints where >= 0.5 (PIL: >= 128).
        """
        from genkit import images as readers
        from genkit.data.decode import to_tensor

        factor = self.vae_scale_factor
        items = self._edit_items(image, rows, "image", readers.read_image)
        sizes = [_size_of(x) for x in items]
        width, height = readers.target_size(sizes[0], width, height, factor)
        tensors = []
        for item, size in zip(items, sizes):
            if torch.is_tensor(item):
                _check_tensor_size(item, size, width, height, "image")
                low, high = float(item.min()), float(item.max())
                if low < -1 - 1e-4 or high > 1 + 1e-4 or not np.isfinite([low, high]).all():
                    raise GenkitError(f"tensor values must be in [-1, 1], got min {low:.3g}, max {high:.3g} "
                                      "(map [0, 1] pixels with x * 2 - 1)", param="image")
                tensors.append(item.float().cpu().clamp(-1, 1))
            else:
                tensors.append(to_tensor(readers.fit_to_size(item, width, height, factor)))
        init = _rows(tensors, rows)
        if mask_image is None:
            return init, None, width, height
        masks = self._edit_items(mask_image, rows, "mask_image", readers.read_mask)
        repaint = []
        for k, item in enumerate(masks):
            own = _size_of(item)
            for r in ([k] if len(masks) == rows else range(rows)):
                image_size = sizes[r if len(sizes) == rows else 0]
                edit.check_mask_size(own, image_size, param="mask_image")
            if torch.is_tensor(item):
                low, high = float(item.min()), float(item.max())
                if low < 0 or high > 1 or not np.isfinite([low, high]).all():
                    raise GenkitError(f"tensor values must be in [0, 1], got min {low:.3g}, max {high:.3g}",
                                      param="mask_image")
                flag = item.float().cpu()[None] >= 0.5
                if (own[0], own[1]) != (width, height):
                    flag = torch.nn.functional.interpolate(flag.float(), size=(height, width), mode="nearest") > 0.5
                repaint.append(flag[0])
            else:
                grey = np.asarray(readers.fit_to_size(item, width, height, factor))
                repaint.append(torch.from_numpy(grey >= 128)[None])
        repaint = _rows(repaint, rows)
        for r in range(rows):
            share = float(repaint[r].float().mean())
            edit.check_coverage(share, param="mask_image", which=f"(row {r})" if len(masks) > 1 else "")
        return init, repaint, width, height

    @staticmethod
    def _edit_items(value, rows: int, name: str, read) -> list:
        """One item per given image: (channels, h, w) tensors, or PIL images read by `read`."""
        if torch.is_tensor(value):
            items = list(_batch_tensor(value, name))
        else:
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            items = [item if torch.is_tensor(item) else read(item) for item in items]
            for k, item in enumerate(items):
                if torch.is_tensor(item):
                    items[k] = _tensor_item(item, name)
        if len(items) not in (1, rows):
            raise GenkitError(f"{name}: got {len(items)} for {rows} images (prompts x num_images_per_prompt); pass one "
                              "for all, or one per image")
        return items


def _control():
    from genkit.families.genkit_mini import control

    return control


def _batch_tensor(value: torch.Tensor, name: str) -> torch.Tensor:
    """A (batch, channels, h, w) view of an image (3 channels) or mask (1 channel) tensor."""
    want = 3 if name == "image" else 1
    if name == "mask_image" and value.dim() == 2:  # (h, w)
        value = value[None]
    if value.dim() == 3:
        value = value[None]
    if value.dim() != 4 or value.shape[1] != want or 0 in value.shape:
        shape = "(batch, 3, h, w) in [-1, 1]" if want == 3 else "(batch, 1, h, w) in [0, 1]"
        raise GenkitError(f"tensor has shape {tuple(value.shape)}; pass {shape}", param=name)
    return value


def _tensor_item(value: torch.Tensor, name: str) -> torch.Tensor:
    """One list element that is a tensor: (channels, h, w)."""
    value = _batch_tensor(value, name)
    if value.shape[0] != 1:
        raise GenkitError(f"list holds a tensor of {value.shape[0]} images; pass one image per list element", param=name)
    return value[0]


def _size_of(item) -> tuple[int, int]:
    """(width, height) of a PIL image or a (channels, h, w) tensor."""
    return (int(item.shape[-1]), int(item.shape[-2])) if torch.is_tensor(item) else item.size


def _check_tensor_size(item, size, width, height, name) -> None:
    if size != (width, height):
        raise GenkitError(f"tensor is {size[0]}x{size[1]} but the call makes {width}x{height} images (resize "
                          "the tensor, or pass a PIL image, which is resized)", param=name)


def _rows(items: list[torch.Tensor], rows: int) -> torch.Tensor:
    """(rows, ...) from one item per row, or one item for all rows."""
    stacked = torch.stack(items)
    return stacked.expand(rows, *stacked.shape[1:]).contiguous() if len(items) == 1 else stacked
