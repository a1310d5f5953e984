"""The family seam: everything the engine, the loader, the trainers and the server ask of a model family.

Today's text-to-image models differ in more than weights: a UNet or a transformer denoiser, one to
three text encoders, epsilon / v / flow-matching targets, true or distilled guidance, size multiples
of 8 to 32, which attention hook they obey, and how their LoRA files are written. A family holds
those answers for one kind of diffusers pipeline; `genkit.families` finds the family of a loaded
pipeline from its class name. Nothing outside `genkit/families/` names a family
(tests/test_architecture.py checks it).

`Family` below is the protocol: each member says what it answers, grouped as

- **identity and loading**: name, title, pipeline classes, file format, `load`, `tokenizer`;
- **inference**: denoiser, sizes, defaults, samplers, call arguments, text reading (prompt cuts,
  CLIP chunks, empty negatives), editing pipelines, ControlNet, attention;
- **training**: the prediction target, caption and image encodings, the denoiser's forward call,
  which prior sources and text-encoder adapters it supports (the objectives themselves are plain
  functions in genkit.train.objectives);
- **LoRA files**: how adapters are saved, read, loaded, switched and removed, and kohya's naming.

A new family subclasses `UNetFamily`, `TransformerFamily` or `FlowFamily` (or `Family` itself),
implements the abstract members and overrides what differs. Stable Diffusion 1.x (families/sd.py)
is one implementation beside the others.

(Over 500 lines on purpose: this is the whole seam, each member documented where it is declared, so a newcomer reads
one file to learn what a family must answer.)
"""

from __future__ import annotations

import abc
import contextlib
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, NamedTuple

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
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")  # what diffusers' LoRA files name


class KohyaLayer(NamedTuple):
    """One layer of a transformer's original model (Black Forest Labs', Alibaba's ...), as kohya's and ComfyUI's files
    name it, and the diffusers layers it holds (genkit.lora.files exports onto it)."""

    original: str  # its path in the original model, e.g. double_blocks.0.img_attn.qkv
    parts: tuple  # the diffusers layers fused into it, in order (one: the same layer under another name)
    widths: tuple = ()  # the parts' output widths relative to one another (fused only: q, k, v, mlp = 1, 1, 1, 4)
    swap: bool = False  # the original holds (shift, scale) where diffusers holds (scale, shift): rows swapped


@dataclass(frozen=True)
class Kohya:
    """How kohya's sd-scripts (and A1111, ComfyUI) name a family's LoRA files, for `genkit lora export`."""

    base_version: str  # ss_base_model_version (sd-scripts' library/train_util.py)
    prefixes: dict = field(default_factory=dict)  # diffusers component -> kohya key prefix
    v2_width: int | None = None  # a text context this wide makes the file an SD 2.x one ("sd_v2")
    # transformers: a diffusers layer's original (KohyaLayer, None where the original model has none); UNet families
    # keep diffusers' paths (None here)
    layer: Callable | None = None
    reader: str | None = None  # the diffusers loader class that reads the exported file back (the export's check)
    layouts: tuple = ("kohya",)  # kohya: lora_unet_<original, "_" for ".">; comfyui: diffusion_model.<original>
    comfyui_keys: tuple = ("lora_down", "lora_up")  # the comfyui layout's names of a pair (ai-toolkit's: lora_A/B)
    comfyui_alphas: bool = True  # whether the comfyui layout carries `.alpha` (Flux.2's diffusers reader refuses it)

    def version(self, context_width: int | None) -> str:
        return "sd_v2" if self.v2_width and context_width == self.v2_width else self.base_version


def same_layer(layer: str) -> KohyaLayer:
    """`Kohya.layer` of a transformer whose original model names its layers as diffusers does (Qwen-Image, Z-Image)."""
    return KohyaLayer(layer, (layer,))


def load_diffusers(source: str, dtype, use_safetensors, local: bool):
    """A diffusers pipeline folder or hub id, as `DiffusionPipeline.from_pretrained` reads it."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, use_safetensors=use_safetensors,
                                             local_files_only=local)


def original_key(keys, name: str) -> bool:
    """`name` is among a single file's tensor names, bare or under the original models' "model.diffusion_model." prefix."""
    return name in keys or f"model.diffusion_model.{name}" in keys


def cut_prompt(tokenizer, limit: int | None, prompt: str) -> dict | None:
    """What a tokenizer that keeps `limit` tokens drops of `prompt`: {"tokens": limit, "dropped": text}, or None."""
    if tokenizer is None or not limit or not prompt:
        return None
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    if len(ids) <= limit:
        return None
    end = 1 if ids[-1] in set(tokenizer.all_special_ids) else 0  # the closing token is kept past the cut
    dropped = tokenizer.decode(ids[limit - end:len(ids) - end], skip_special_tokens=True).strip()
    return {"tokens": limit, "dropped": dropped} if dropped else None


def _listed(value):
    """A config value as comparable (JSON gives lists where a model built in memory holds tuples)."""
    return list(value) if isinstance(value, (list, tuple)) else value


class Family(abc.ABC):
    """The protocol. Abstract members must be given; the rest are the usual diffusers answers."""

    # -- identity and loading ---------------------------------------------------------------
    name: str  # the family's name in records, configs/lora.toml tables and presets
    title: str  # how messages name it
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name`s that are this family
    file_format = "diffusers"  # "diffusers" folders, or "genkit" (genkit-mini's own)

    def load(self, source: str, *, dtype, use_safetensors, local: bool):
        """The loaded pipeline object of a folder (or hub id) of this family."""
        return load_diffusers(source, dtype, use_safetensors, local)

    def tokenizer(self, source: str):
        """The tokenizer of the main text conditioning, read without any weights."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, subfolder=self.prompt_tokenizer)

    # -- loading single files (A1111's and ComfyUI's checkpoints; genkit.single_file) -------------
    def single_file_kind(self, keys) -> str | None:
        """What a single file whose tensors are named `keys` (a set, read from its header) is to this family:
        "checkpoint" (every component in the original layouts, as A1111's and ComfyUI's checkpoints hold them),
        "denoiser" (the denoiser alone: ComfyUI's models/unet and models/diffusion_models), or None (not this family's)."""
        return None

    def single_file_base(self, keys) -> str | None:
        """The preset whose folder gives such a file's configs and tokenizers (and, for a denoiser alone, the other
        components) when no base is named; None: a base must be named."""
        return None

    def single_file_state(self, file):
        """The denoiser's weights as a state dict when diffusers' converter cannot read `file` itself; None: it can."""
        return None

    def load_single_file(self, file, kind: str, base, *, dtype, use_safetensors):
        """The pipeline of single file `file` (of `kind`, see `single_file_kind`) with configs, tokenizers and scheduler
        from local diffusers folder `base` (and, for a denoiser alone, the other components' weights too), through
        diffusers' `from_single_file` with `config=base`, so nothing is downloaded."""
        import json

        import diffusers

        pipeline = getattr(diffusers, self.pipeline_classes[0])
        if kind == "checkpoint":
            return pipeline.from_single_file(str(file), config=str(base), torch_dtype=dtype, local_files_only=True)
        index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
        denoiser_class = getattr(diffusers, index[self.denoiser_name][1])
        weights = self.single_file_state(file)
        denoiser = denoiser_class.from_single_file(str(file) if weights is None else weights, config=str(base),
                                                   subfolder=self.denoiser_name, torch_dtype=dtype,
                                                   local_files_only=True)
        return pipeline.from_pretrained(str(base), torch_dtype=dtype, use_safetensors=use_safetensors,
                                        local_files_only=True, **{self.denoiser_name: denoiser})

    # -- inference: the denoiser, sizes and defaults -----------------------------------------
    denoiser_name: str  # the pipeline attribute that holds the denoiser
    latent = True  # a VAE maps pixels to latents (genkit-mini works in pixels)
    flow = False  # flow-matching sampling (its own sampler names)
    guidance_scale = 7.0  # default --guidance
    num_inference_steps = 25  # default --steps
    scheduler = "default"  # default sampler: the model's own
    checked_multiple = 1  # the side multiple the family's pipelines check whatever the model (SD/SDXL/PixArt: 8)

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_name)

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        return [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(pipe, n, None) is not None]

    def multiple(self, pipe) -> int:
        """Width and height must be multiples of this: what its latents need and what its pipelines check."""
        return math.lcm(self.latent_multiple(pipe), self.checked_multiple)

    def latent_multiple(self, pipe) -> int:
        """The side multiple the model itself needs (the VAE's factor; transformers: whole patches too)."""
        return int(getattr(pipe, "vae_scale_factor", 8))

    def patch(self, pipe) -> int:
        """Latent pixels per denoiser token side (transformers patchify; a UNet sees every latent pixel)."""
        return 1

    def default_size(self, pipe) -> int:
        """The side the family's pipeline makes when not told: the denoiser's sample size (in latent pixels, also for
        patchifying transformers) times the VAE's factor."""
        size = self.denoiser(pipe).config.sample_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(size) * (int(getattr(pipe, "vae_scale_factor", 8)) if self.latent else 1)

    def defaults(self, pipe) -> dict:
        size = self.default_size(pipe)
        return {"width": size, "height": size, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "scheduler": self.scheduler, "negative_prompt": ""}

    def samplers(self) -> tuple[str, ...]:
        """The sampler names (genkit.schedulers) this family's pipelines can run; others are refused."""
        return FLOW_SAMPLERS if self.flow else UNET_SAMPLERS

    # -- inference: dtypes and decoding --------------------------------------------------------
    # fp16 overflows the activations of today's large transformers into NaN, black images (Flux: diffusers#9096; SD3.5,
    # Chroma, Qwen-Image, Z-Image): their authors run them in bf16, which has fp32's range. So a family runs in bf16
    # (fp32 on a GPU without it) unless it says otherwise; a CPU runs every family in fp32 unless told.
    dtypes: tuple[str, ...] = ("bf16", "fp32")  # the --dtype values it runs in (the others are refused)
    gpu_dtypes: tuple[str, ...] = ("bf16", "fp32")  # its default on a GPU: the first one the GPU computes in

    def gpu_dtype(self, bf16: bool) -> str:
        """Its default dtype on a GPU; `bf16`: the GPU computes in bf16 natively (NVIDIA Ampere and later)."""
        return next(dtype for dtype in self.gpu_dtypes if bf16 or dtype != "bf16")

    def vae_upcast(self, pipe) -> bool:
        """Its pipelines decode in fp32 by themselves at the pipeline's dtype (SDXL's VAE in fp16: force_upcast)."""
        return False

    def decode(self, pipe, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Pixels in [-1, 1], (batch, 3, height, width), of the latents the pipeline passed its last step's callback,
        decoded as its own decode does, in the VAE's dtype (the engine decodes again in fp32 when that made NaN)."""
        config = pipe.vae.config
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        return pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]

    # -- inference: the call -----------------------------------------------------------------
    negative_prompt = True  # the call takes a negative prompt (for classifier-free guidance)
    empty_negative_is_zeros = False  # an empty negative is passed as none (the pipeline uses zeros, not "")

    def call_args(self, batch, generators, on_step) -> dict:
        """The diffusers pipeline call for one batch of jobs (all sharing steps, guidance, size, sampler)."""
        first = batch[0]
        args = dict(prompt=[job.prompt for job in batch], num_inference_steps=first.num_inference_steps,
                    guidance_scale=first.guidance_scale, width=first.width, height=first.height,
                    generator=generators, callback_on_step_end=on_step)
        if self.negative_prompt:
            args["negative_prompt"] = [job.negative_prompt for job in batch]
            if self.empty_negative_is_zeros and not any(args["negative_prompt"]):
                del args["negative_prompt"]  # the pipeline's own default (zeros); batches never mix empty and not
        return args

    def check_job(self, job) -> None:
        """Refuse settings this family cannot honour (before any work)."""
        if job.negative_prompt and not self.negative_prompt:
            raise GenkitError(f"is not read: {self.title} models take no negative prompt (drop it)", param="negative_prompt")

    # -- inference: reading the prompt ---------------------------------------------------------
    prompt_tokenizer = "tokenizer"  # the tokenizer of the text the denoiser mostly reads
    max_sequence_length: int | None = None  # the pipeline's own cap on it (None: the tokenizer's model_max_length)
    long_prompts: tuple[str, ...] = ("truncate",)  # ways to read a prompt past the encoder's length; first: default

    def prompt_limit(self, pipe):
        """(tokenizer, tokens it keeps) of the main text conditioning; a longer prompt is cut there."""
        tokenizer, limit = getattr(pipe, self.prompt_tokenizer, None), self.max_sequence_length
        if tokenizer is None:  # e.g. SD3 loaded without its T5: the CLIP tokenizer's own length
            tokenizer, limit = getattr(pipe, "tokenizer", None), None
        if tokenizer is None:
            return None, None
        limit = limit or tokenizer.model_max_length
        return tokenizer, (limit if limit and limit < 100_000 else None)

    def prompt_cut(self, pipe, prompt: str, mode: str) -> dict | None:
        """What the text encoder drops of `prompt` read in `mode` (one of `long_prompts`): {"tokens", "dropped"}."""
        return cut_prompt(*self.prompt_limit(pipe), prompt)

    def prompt_notice(self, pipe, prompt: str) -> list[str] | None:
        """The words of `prompt` this model was never taught (said once as an UnknownWordsWarning, and recorded with
        each image as `prompt_unknown_words`); None: nothing to say, as for a model of the open world."""
        return None

    def chunks(self, pipe, text: str) -> int:
        """Pieces `text` is read in under the "chunk" mode (1: read as the pipeline reads it)."""
        return 1

    def chunked_args(self, pipe, batch, chunks: int, args: dict) -> dict:
        """`args` with the text given as embeddings of `chunks` pieces (families with a "chunk" mode)."""
        raise NotImplementedError(f"{self.title} reads no prompt in chunks")

    # -- inference: prompt weights (genkit.prompt_syntax) ---------------------------------------
    prompt_weights = False  # its text encoder takes A1111's (word:1.3) weights (CLIP families, via compel)

    def check_weights(self) -> None:
        """Refuse in one line, before any work, when what reading weights needs is not installed."""

    def weighted_chunks(self, pipe, text: str) -> int:
        """Pieces a prompt with A1111's weight syntax is read in (families with `prompt_weights`)."""
        raise NotImplementedError(f"{self.title} reads no weighted prompts")

    def weighted_args(self, pipe, batch, chunks: int, args: dict) -> dict:
        """`args` with the text given as weighted embeddings of `chunks` pieces (families with `prompt_weights`)."""
        raise NotImplementedError(f"{self.title} reads no weighted prompts")

    # -- inference: the hires fix (genkit.hires) -------------------------------------------------
    hires_output = "latent"  # the first pass's output_type when its latents are upscaled (A1111's "Latent")

    def hires_latents(self, pipe, output, width: int, height: int, new_width: int, new_height: int) -> torch.Tensor:
        """The first pass's `output` (its images with output_type `hires_output`, width x height) upscaled to
        new_width x new_height in the form the family's img2img pipeline takes as `image`: A1111's "Latent" upscaler
        (bilinear, no antialiasing) on (batch, channels, h, w) latents."""
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        return torch.nn.functional.interpolate(output, size=(new_height // factor, new_width // factor),
                                               mode="bilinear", antialias=False)

    # -- inference: editing --------------------------------------------------------------------
    edit_tasks: tuple[str, ...] = ("img2img", "inpaint")  # diffusers has these pipelines for the family

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
            param, what = {"img2img": ("image", "image-to-image"), "inpaint": ("mask", "inpainting")}[task]
            raise GenkitError(f"for {what}: {self.title} models have no {task} pipeline in diffusers (families with it: "
                              f"{', '.join(have)}); drop the input image or use one of those", param=param)

    # -- inference: ControlNet (genkit.controlnet) -----------------------------------------------
    controlnet_classes: tuple[str, ...] = ()  # diffusers' ControlNet model classes that fit (none: no ControlNet)
    controlnet_several = True  # its ControlNet pipeline takes several ControlNets at once (their residuals summed)
    controlnet_bounds = True  # ... and each one's start and end (control_guidance_start/_end)
    control_image_arg = "control_image"  # the call's word for the control images (SD's and SDXL's: "image")
    controlnet_pipeline: str | None = None  # diffusers' text-to-image ControlNet pipeline class for the family
    # (controlnet config key, denoiser config key) that must be equal for a ControlNet to fit the denoiser
    controlnet_fit: tuple[tuple[str, str], ...] = ()

    def control_pipe(self, pipe, controlnets: list):
        """The family's text-to-image ControlNet pipeline (`controlnet_pipeline`) holding `controlnets` (one, or several
        as diffusers' MultiControlNet), made of `pipe`'s loaded components (genkit.families.shared.sharing: no copy,
        no dtype cast)."""
        import diffusers

        from genkit.families.shared import sharing

        held = controlnets[0] if len(controlnets) == 1 else list(controlnets)
        return sharing(getattr(diffusers, self.controlnet_pipeline), pipe, controlnet=held)

    def control_args(self, pipe, batch, generators, units: list, images: list[list]) -> dict:
        """The call's ControlNet arguments: `images[k]` holds unit k's control image for each row of the batch. One
        ControlNet takes a list of one image per row; several take one image each (diffusers' SDXL pipeline takes no
        more), which every row of the batch shares (genkit.controlnet.batch_key keeps other images apart)."""
        one = len(units) == 1

        def each(values):
            return values[0] if one else list(values)

        args = {self.control_image_arg: images[0] if one else [rows[0] for rows in images],
                "controlnet_conditioning_scale": each([u.weight for u in units])}
        if self.controlnet_bounds:
            args.update(control_guidance_start=each([u.start for u in units]),
                        control_guidance_end=each([u.end for u in units]))
        return args

    def controlnet_misfit(self, pipe, controlnet) -> str | None:
        """Why `controlnet` cannot steer `pipe`'s denoiser (its sizes differ), or None when it fits."""
        mine, theirs = self.denoiser(pipe).config, controlnet.config
        for key, own in self.controlnet_fit:
            if key in theirs and own in mine and _listed(theirs[key]) != _listed(mine[own]):
                return f"its {key} is {theirs[key]}, the model's {mine[own]}"
        return None

    def new_controlnet(self, pipe) -> torch.nn.Module:
        """A new ControlNet for `pipe`'s denoiser, as diffusers' ControlNet training starts one (its output layers at
        zero, so it changes nothing until trained): for genkit.testing's tiny ones and a ControlNet trainer."""
        raise NotImplementedError(f"{self.title} has no ControlNet in diffusers")

    def load_controlnet_file(self, pipe, file, dtype) -> torch.nn.Module:
        """A ControlNet from one .safetensors file (diffusers' from_single_file where it reads the family's)."""
        raise GenkitError(f"model={file}: {self.title} ControlNets are read from diffusers folders (config.json beside "
                          "the weights); diffusers reads no single file of them", param="control")

    # -- inference: IP-Adapter (genkit.ipadapter) -----------------------------------------------
    ip_adapter_pipelines: tuple[str, ...] = ()  # the family's diffusers pipelines that load an IP-Adapter
    ip_adapter_layout: tuple[str, ...] = ()  # the key prefixes of an IP-Adapter file made for the family

    @property
    def ip_adapter(self) -> bool:
        """Whether the family's pipeline loads an IP-Adapter (a family on another pipeline than its parent's does not,
        unless it names its own)."""
        return bool(set(self.ip_adapter_pipelines) & set(self.pipeline_classes))

    def load_ip_adapter(self, pipe, file) -> None:
        """Load the IP-Adapter weights `file` into `pipe` (its image encoder already in place) by diffusers' loader."""
        raise NotImplementedError(f"{self.title} takes no IP-Adapter in diffusers")

    def ip_adapter_shapes(self, pipe, image_embed_dim: int) -> dict[str, tuple[int, ...]]:
        """The tensors (names, shapes) of an IP-Adapter file for `pipe`'s denoiser reading image embeddings
        `image_embed_dim` wide, in the family's layout: genkit.testing's tiny ones, what `ip_adapter_misfit` checks."""
        raise NotImplementedError(f"{self.title} takes no IP-Adapter in diffusers")

    def ip_adapter_misfit(self, pipe, shapes: dict) -> str | None:
        """Why an IP-Adapter with tensors `shapes` cannot steer `pipe`'s denoiser (its layers or sizes differ), or
        None: the adapter's cross-attention tensors against `ip_adapter_shapes`' (its image projection is checked
        against the image encoder)."""
        projection = self.ip_adapter_layout[0]  # the image projection's prefix, then the attention layers'

        def attention(tensors):
            return {key: shape for key, shape in tensors.items() if not key.startswith(projection)}

        own, theirs = attention(self.ip_adapter_shapes(pipe, 1)), attention(shapes)
        layers = [len({key.rsplit(".", 2)[0] for key in tensors}) for tensors in (theirs, own)]
        if layers[0] != layers[1] or set(theirs) != set(own):
            return f"it adapts {layers[0]} attention layers and the model has {layers[1]}"
        for key, shape in own.items():
            if theirs[key] != shape:
                return f"its {key} is {'x'.join(map(str, theirs[key]))}, the model's {'x'.join(map(str, shape))}"
        return None

    # -- inference: attention ----------------------------------------------------------------
    # genkit.attention probes each backend in the dtypes and head sizes of the layers it would reach
    # (`attention_modules`), through the route the model takes (`dispatcher`), then the family applies the choice
    # to that pipeline alone (`apply_attention`).
    dispatcher = False  # the model calls diffusers' dispatch_attention_fn (each processor is given its backend)
    attention_masked = False  # its attention calls pass a boolean mask (the probe passes one too)

    def attention_unfit(self, backend: Attention) -> str | None:
        """Why this family's models cannot use `backend` at all, with the fix (None: they can, if its probe runs)."""
        from genkit import attention

        if backend is not Attention.AUTO and attention.PROCESSORS not in attention.SPECS[backend].routes \
                and not self.dispatcher:
            return (f"{backend.value} runs through diffusers' attention dispatcher, which {self.title} models do not "
                    f"call (use {term('attention')} sdpa or xformers)")
        return None

    def attention_modules(self, pipe, backend: Attention) -> list[torch.nn.Module]:
        """The models of `pipe` whose attention `backend` reaches (the probe asks it in their dtypes and head sizes)."""
        return [self.denoiser(pipe)]

    @abc.abstractmethod
    def apply_attention(self, pipe, backend: Attention) -> None:
        """Make `pipe` compute attention with `backend` from its next call on, without touching any other pipeline."""

    def attention_context(self, backend: Attention):
        """A context the pipeline call runs in (transformer families choose SDPA's kernel here)."""
        return contextlib.nullcontext()

    # -- training ----------------------------------------------------------------------------
    prior_sources: tuple[str, ...] = ("model", "none")  # where prior-preservation images may come from
    text_encoder_lora = False  # `genkit train lora` can adapt the (first) text encoder too

    @abc.abstractmethod
    def target(self, pipe) -> Target:
        """What the denoiser predicts (genkit.train.objectives turns it into noisy inputs and targets)."""

    @abc.abstractmethod
    def encode_captions(self, pipe, captions: list[str], device) -> dict[str, torch.Tensor]:
        """What the denoiser reads of each caption, every tensor with the batch first (cached by the trainer)."""

    @abc.abstractmethod
    def forward(self, pipe, denoiser, noisy, t, cond: dict) -> torch.Tensor:
        """The denoiser's prediction for a training batch."""

    def encode_captions_with(self, pipe, text_encoder, captions: list[str], device) -> dict[str, torch.Tensor]:
        """`encode_captions` through `text_encoder` (being trained, with gradients): families with `text_encoder_lora`."""
        raise NotImplementedError(f"{self.title} trains no text-encoder adapters")

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

    def add_adapter(self, denoiser, config) -> None:
        """Add the trained LoRA adapter (a peft LoraConfig) to the denoiser."""
        denoiser.add_adapter(config)

    # -- LoRA files --------------------------------------------------------------------------
    lora_layout = "diffusers"  # "diffusers" (lora.down/up, what UNet loaders expect) or "peft" (lora_A/B)
    kohya: Kohya | None = None  # kohya's naming of the family's LoRA files, where genkit can export to it

    def lora_components(self, pipe) -> list[str]:
        """The pipeline's components a LoRA file may adapt."""
        return [c for c in LORA_COMPONENTS if getattr(pipe, c, None) is not None]

    def lora_loader(self, pipe):
        """The diffusers class whose `lora_state_dict` reads this family's LoRA files (kohya keys converted)."""
        return type(pipe)

    def lora_read_args(self, pipe) -> dict:
        """Extra arguments `lora_loader(pipe).lora_state_dict` needs."""
        return {}

    def load_lora(self, pipe, file, state_dict: dict, alphas, metadata, adapter: str) -> None:
        """Load one LoRA file into the pipeline as adapter `adapter`."""
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter,
                               use_safetensors=file.suffix == ".safetensors")

    def set_loras(self, pipe, names: list[str], scales: list[float]) -> None:
        """Make exactly `names` the active adapters, each at its scale."""
        pipe.set_adapters(names, adapter_weights=scales)

    def unload_lora(self, pipe, adapter: str) -> None:
        """Remove adapter `adapter` (also a half-loaded one)."""
        pipe.delete_adapters(adapter)

    def save_lora(self, pipe, folder, layers: dict, metadata: dict, weight_name: str) -> None:
        """Write the adapters as diffusers' `<Pipeline>.save_lora_weights` does for this pipeline class."""
        kwargs = {f"{self.denoiser_name}_lora_layers": layers[self.denoiser_name],
                  f"{self.denoiser_name}_lora_adapter_metadata": metadata[self.denoiser_name]}
        if "text_encoder" in layers:
            kwargs.update(text_encoder_lora_layers=layers["text_encoder"],
                          text_encoder_lora_adapter_metadata=metadata["text_encoder"])
        type(pipe).save_lora_weights(folder, safe_serialization=True, weight_name=weight_name, **kwargs)


class UNetFamily(Family):
    """UNet denoisers: diffusers' attention processors, and the prediction type of the model's scheduler."""

    denoiser_name = "unet"

    def attention_modules(self, pipe, backend: Attention) -> list[torch.nn.Module]:
        """Every model with attention processors (UNet, VAE); a half-precision kernel reaches the UNet alone, as the
        VAE may decode in fp32 (SDXL's upcast, the engine's NaN retry)."""
        from genkit import attention

        if attention.SPECS[backend].half:
            return [self.denoiser(pipe)]
        return [module for module in pipe.components.values() if hasattr(module, "set_attn_processor")]

    def apply_attention(self, pipe, backend: Attention) -> None:
        from diffusers.models import attention_processor as processors

        chosen = {Attention.MATH: processors.AttnProcessor, Attention.XFORMERS: processors.XFormersAttnProcessor}
        reached = self.attention_modules(pipe, backend)
        for module in pipe.components.values():
            if not hasattr(module, "set_attn_processor"):
                continue
            if not any(module is other for other in reached):  # left on SDPA
                module.set_attn_processor(processors.AttnProcessor2_0())
            elif backend is Attention.SLICED and hasattr(module, "set_attention_slice"):
                module.set_attention_slice("auto")
            else:
                module.set_attn_processor(chosen.get(backend, processors.AttnProcessor2_0)())

    def target(self, pipe) -> Target:
        return Target(pipe.scheduler.config.get("prediction_type", "epsilon"))

    def forward(self, pipe, denoiser, noisy, t, cond) -> torch.Tensor:
        return denoiser(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    # ControlNet (Zhang et al. 2023, https://arxiv.org/abs/2302.05543): a trainable copy of the UNet's encoder whose
    # conditioning embedding brings the control image down to the latents' size (SD's: 512 -> 64, four levels)
    controlnet_classes = ("ControlNetModel",)
    controlnet_pipeline = "StableDiffusionControlNetPipeline"
    controlnet_fit = (("in_channels", "in_channels"), ("cross_attention_dim", "cross_attention_dim"),
                      ("block_out_channels", "block_out_channels"), ("addition_embed_type", "addition_embed_type"))
    CONDITIONING_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNetModel default: each level after the first halves

    def controlnet_factor(self, pipe) -> int:
        """How much smaller than the image the denoiser's sample is (the VAE's factor; 1 in pixel space)."""
        return int(getattr(pipe, "vae_scale_factor", 8)) if self.latent else 1

    def controlnet_misfit(self, pipe, controlnet) -> str | None:
        levels = len(controlnet.config.conditioning_embedding_out_channels)
        if 2 ** (levels - 1) != self.controlnet_factor(pipe):
            return (f"it reduces the control image {2 ** (levels - 1)}x and the model's samples are "
                    f"{self.controlnet_factor(pipe)}x smaller than its images")
        return super().controlnet_misfit(pipe, controlnet)

    def new_controlnet(self, pipe) -> torch.nn.Module:
        """diffusers' `ControlNetModel.from_unet`: the UNet's encoder and middle copied, zero convolutions out, and a
        conditioning embedding with one level per halving between the image and the sample."""
        from diffusers import ControlNetModel

        levels = int(math.log2(self.controlnet_factor(pipe))) + 1
        return ControlNetModel.from_unet(self.denoiser(pipe),
                                         conditioning_embedding_out_channels=self.CONDITIONING_CHANNELS[:levels])

    def controlnet_config(self, pipe, file) -> dict:
        """A single file's ControlNet config: the config.json beside it, else `new_controlnet`'s (made on the meta
        device: no weights), as A1111 reads a ControlNet file against the loaded model."""
        import json

        beside = file.with_name("config.json")
        if beside.is_file():
            return json.loads(beside.read_text(encoding="utf-8"))
        from accelerate import init_empty_weights

        with init_empty_weights():
            return dict(self.new_controlnet(pipe).config)

    def load_controlnet_file(self, pipe, file, dtype) -> torch.nn.Module:
        """A ControlNet file in diffusers' names (loaded into its config) or in the original ControlNet's (converted
        by diffusers' `ControlNetModel.from_single_file`, with the config, so nothing is downloaded)."""
        import json
        import tempfile

        from diffusers import ControlNetModel
        from safetensors import safe_open
        from safetensors.torch import load_file

        config = self.controlnet_config(pipe, file)
        with safe_open(str(file), "pt") as opened:
            diffusers_names = "controlnet_cond_embedding.conv_in.weight" in set(opened.keys())
        if diffusers_names:
            model = ControlNetModel.from_config(config)
            model.load_state_dict(load_file(str(file)), strict=True)
            return model.to(dtype)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "config.json").write_text(json.dumps(config), encoding="utf-8")
            return ControlNetModel.from_single_file(str(file), config=folder, torch_dtype=dtype,
                                                    local_files_only=True)

    def lora_read_args(self, pipe) -> dict:
        import inspect

        wanted = inspect.signature(self.lora_loader(pipe).lora_state_dict).parameters
        return {"unet_config": pipe.unet.config} if "unet_config" in wanted else {}


class DenoiserLoRA:
    """A mixin for families whose pipeline class has no diffusers LoRA loader: adapters go into the denoiser only,
    read with Stable Diffusion's loader (`lora.down`/`lora.up` and kohya keys alike) and put in place with peft."""

    def lora_components(self, pipe) -> list[str]:
        return [self.denoiser_name]

    def lora_loader(self, pipe):
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return StableDiffusionLoraLoaderMixin

    def load_lora(self, pipe, file, state_dict, alphas, metadata, adapter) -> None:
        from genkit.lora import inject_peft, peft_layout

        inject_peft(self.denoiser(pipe), peft_layout(state_dict), self.denoiser_name, metadata, adapter)

    def set_loras(self, pipe, names, scales) -> None:
        from peft.tuners.lora import LoraLayer

        for layer in self.denoiser(pipe).modules():
            if isinstance(layer, LoraLayer):
                layer.set_adapter(names)
                for name, scale in zip(names, scales):
                    layer.set_scale(name, scale)

    def unload_lora(self, pipe, adapter) -> None:
        from peft.tuners.lora import LoraLayer

        for layer in self.denoiser(pipe).modules():
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
                layer.delete_adapter(adapter)


class TransformerFamily(Family):
    """Transformer denoisers (DiT / MMDiT): SDPA inside their own processors, patchified latents."""

    denoiser_name = "transformer"
    lora_layout = "peft"  # diffusers' SD3/Flux/SANA training scripts save peft's lora_A/lora_B keys

    def patch(self, pipe) -> int:
        return int(getattr(self.denoiser(pipe).config, "patch_size", 1) or 1)

    def latent_multiple(self, pipe) -> int:
        """A latent side must hold whole patches (PixArt's own check says 8 and then crashes on 24 or 40)."""
        return int(pipe.vae_scale_factor) * self.patch(pipe)

    def attention_unfit(self, backend: Attention) -> str | None:
        if backend is Attention.SLICED:
            return (f"sliced attention is for UNet models; {self.title} computes attention in its own processors "
                    f"(use {term('attention')} sdpa or math)")
        return super().attention_unfit(backend)

    def apply_attention(self, pipe, backend: Attention) -> None:
        """Their processors are their own (joint, linear, rotary): a dispatcher model's are each given the backend;
        others swap to diffusers' xformers twin and back; SDPA's math kernel is chosen per call."""
        from genkit import attention

        if self.dispatcher:
            attention.set_dispatch_backend(self.denoiser(pipe), backend)
        else:
            attention.swap_processors(self.denoiser(pipe), xformers=backend is Attention.XFORMERS)

    def attention_context(self, backend: Attention):
        if backend is Attention.MATH:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()

    def target(self, pipe) -> Target:
        return Target(pipe.scheduler.config.get("prediction_type", "epsilon"))


class FlowFamily(TransformerFamily):
    """Flow-matching transformers: x_t = (1 - s) x0 + s noise, target noise - x0, timestep s * 1000."""

    flow = True

    def target(self, pipe) -> Target:
        return Target.FLOW
