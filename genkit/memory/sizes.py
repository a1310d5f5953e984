"""Sizes: what a model's components weigh and what running them needs, from their configs alone (genkit.memory).

Every component is built on torch's meta device (shapes without storage) from its config.json (`meta_model`), its
parameters counted at each dtype and weight-only quantization (`FORMATS`, `weight_bytes`), with diffusers'
group-offload groups and each module's own parameters (`count`); the activations of text encoding, one denoiser step
and the VAE decode are estimates, one formula each (`text_activations`, `step_activations`, `decode_activations`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from genkit.errors import GenkitError

GiB, MiB = 1 << 30, 1 << 20
UNITS = {"tib": 1 << 40, "gib": GiB, "mib": MiB, "tb": 10**12, "gb": 10**9, "mb": 10**6}


def parse_bytes(text) -> int:
    """'12GiB', '24 GB', '512MiB' (binary GiB/MiB/TiB or decimal GB/MB/TB) as bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", str(text))
    unit = match and UNITS.get(match.group(2).lower())
    if not unit or float(match.group(1)) <= 0:
        raise GenkitError(f"must be an amount of memory like 12GiB, 24GB or 512MiB, got {text!r}", param="memory")
    return int(float(match.group(1)) * unit)


def gib(n: int) -> str:
    """Bytes for people: GiB with one decimal, MiB under 1 GiB."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


# -- Weights: bytes per weight at each dtype and weight-only quantization ---------------------------------------------

@dataclass(frozen=True)
class Format:
    """What one weight costs. A weight-only quantization (`quantized`) stores the weight matrices of the Linear
    layers so, at `bits` a weight (its block scales included) plus `row_bytes` per output row (a per-channel scale);
    everything else (biases, norms, embeddings, convolutions) stays in the compute dtype, as diffusers' bitsandbytes,
    torchao and GGUF loaders leave it."""

    name: str
    bits: float
    row_bytes: int = 0
    quantized: bool = False
    what: str = ""


FORMATS = {f.name: f for f in (
    Format("fp32", 32, what="float32"),
    Format("bf16", 16, what="bfloat16"),
    Format("fp16", 16, what="float16"),
    Format("fp8", 8, 4, True, "float8 e4m3 weights, a float32 scale per output channel"),
    Format("int8", 8, 4, True, "int8 weights, a float32 scale per output channel"),
    Format("q8_0", 8.5, 0, True, "GGUF Q8_0: blocks of 32 int8 weights and a float16 scale (34 bytes)"),
    Format("nf4", 4.5, 0, True, "bitsandbytes NF4: 4 bits a weight, a float32 absmax per block of 64 "
                                "(no double quantization)"),
    Format("q4_k", 4.5, 0, True, "GGUF Q4_K: super-blocks of 256 weights in 144 bytes (scales and minimums of "
                                 "8 sub-blocks)"),
)}
DTYPES = tuple(name for name, f in FORMATS.items() if not f.quantized)
QUANTIZATIONS = tuple(name for name, f in FORMATS.items() if f.quantized)


@dataclass(frozen=True)
class Weight:
    """One parameter as a plan counts it."""

    numel: int
    rows: int = 0  # output rows when it is a Linear layer's weight matrix (what quantization takes), else 0
    fp32: str = ""  # kept in fp32 at "fp16" alone, or at "half" (fp16 and bf16); "" when it follows the dtype


def weight_bytes(weights, dtype: str, quantization: str | None = None) -> int:
    """Bytes of `weights` at `dtype`, their Linear matrices at `quantization` when given."""
    quantized = FORMATS[quantization] if quantization else None
    total = 0.0
    for w in weights:
        if dtype != "fp32" and (w.fp32 == "half" or (w.fp32 == "fp16" and dtype == "fp16")):
            total += 4 * w.numel
        elif quantized and w.rows:
            total += w.numel * quantized.bits / 8 + w.rows * quantized.row_bytes
        else:
            total += w.numel * FORMATS[dtype].bits / 8
    return math.ceil(total)


@dataclass
class Component:
    """One model of the pipeline, counted on the meta device."""

    name: str
    cls: str
    role: str  # "text" (a text encoder), "denoiser", "vae" or "other"
    module: object  # the torch module, on the meta device
    weights: list[Weight]
    groups: list[list[Weight]]  # diffusers' block-level groups (enable_group_offload), one on the device at a time
    ungrouped: list[Weight]  # what no group holds: on the device whenever the component runs
    layers: list[list[Weight]]  # each module's own parameters: what sequential offload moves at a time

    @property
    def parameters(self) -> int:
        return sum(w.numel for w in self.weights)


def count(name: str, role: str, module) -> Component:
    """`module`'s weights, its group-offload groups and its layers, read off the meta module."""
    import torch

    rows = {id(m.weight): m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)}
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    strict = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    keep_at = "fp16" if type(module).__module__.startswith("transformers") else "half"  # diffusers keeps at both

    def weight(param_name: str, param) -> Weight:
        parts = set(param_name.split("."))
        fp32 = "half" if parts & strict else keep_at if parts & keep else ""
        return Weight(param.numel(), rows.get(id(param), 0), fp32)

    by_id = {id(p): weight(n, p) for n, p in module.named_parameters()}  # tied parameters once

    def of(params) -> list[Weight]:
        return [by_id[id(p)] for p in params if id(p) in by_id]

    groups, ungrouped = _groups(module, set(getattr(module, "_group_offload_block_modules", None) or ()), of)
    layers = [own for m in module.modules() if (own := of(m.parameters(recurse=False)))]
    return Component(name, type(module).__name__, role, module, list(by_id.values()), groups, ungrouped, layers)


def _groups(module, blocks: set, of) -> tuple[list, list]:
    """diffusers' block-level grouping (hooks/group_offloading.py, `_apply_group_offloading_block_level`, one block
    a group): each element of a ModuleList or Sequential child is a group; a child named in the model's
    `_group_offload_block_modules` is grouped the same way inside; the rest stays outside any group."""
    import torch

    groups, ungrouped, grouped = [], [], set()
    for name, child in module.named_children():
        if name in blocks:
            inner, rest = _groups(child, blocks, of)
            groups, ungrouped = groups + inner, ungrouped + rest
        elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            groups += [of(block.parameters()) for block in child]
        else:
            continue
        grouped |= {id(p) for p in child.parameters()}
    ungrouped += of(p for p in module.parameters() if id(p) not in grouped)
    return groups, ungrouped


# -- Activations: estimates, one formula each --------------------------------------------------------------------------

def text_activations(encoder, tokens: int, prompts: int, size: int) -> int:
    """Encoding `prompts` prompts of `tokens` tokens in one text encoder, `size` bytes an element: per token four
    copies of its width d (the residual stream, its norm, the attention's output, a projection) and two of its MLP's
    width f (the hidden layer and its activation), plus the attention scores and their softmax where they are made
    whole (T5 makes them; counted for every encoder, which costs little at CLIP's 77 tokens):

        prompts * (tokens * (4 d + 2 f) + 2 heads tokens^2) * size
    """
    config = encoder.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config  # a VLM's text model
    d = getattr(config, "hidden_size", None) or config.d_model
    f = getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None) or 4 * d
    return prompts * (tokens * (4 * d + 2 * f) + 2 * config.num_attention_heads * tokens**2) * size


TOKEN_COPIES = 18  # transformer blocks: the widths of one token alive at once (traced: Flux.1 17.3, SD3.5 Large 12.4)
UNET_ATTENTION_COPIES = 21  # a UNet transformer block at width C: C-wide tensors alive at once (below)


def step_activations(denoiser, positions: int, text_tokens: int, passes: int, size: int) -> int:
    """One denoiser call on `passes` latents (the batch, twice under classifier-free guidance) of `positions` latent
    positions (a UNet's latent pixels, a transformer's patches), `size` bytes an element.

    A transformer (DiT, MMDiT) keeps only the block running: the residual stream of image and text tokens, their
    norms, q, k, v, the attention's output and the MLP's 4x-wide hidden layer and activation, `TOKEN_COPIES` widths
    D a token in all (text tokens counted as joined to the image's, as MMDiTs do):

        passes * (positions + text_tokens) * 18 D * size

    A UNet keeps every down block's output for its up path (the skips S: conv_in's output, each layer's, each
    downsample's) and at one level the working set: at an attention level 21 C-wide copies (the block's input, its
    GroupNorm and proj_in, the residual stream and its LayerNorm, the GEGLU projection 8C, its GELU and product 4C
    each), at the up block's first resnet its input joined to the skip, that join's norm and activation and two
    outputs (3 (C_coarser + C) + 2 C):

        passes * (S + max over levels of positions_l * working_l) * size
    """
    config = denoiser.config
    if not (hasattr(denoiser, "down_blocks") and hasattr(denoiser, "up_blocks")):
        width = transformer_width(config)
        return passes * (positions + text_tokens) * TOKEN_COPIES * width * size
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    levels = len(channels)
    attention = [hasattr(denoiser.down_blocks[i], "attentions") or hasattr(denoiser.up_blocks[levels - 1 - i],
                                                                            "attentions") for i in range(levels)]
    at = [positions // 4**i for i in range(levels)]  # latent positions at each level, finest first
    skips = channels[0] * at[0] + sum(layers[i] * channels[i] * at[i] for i in range(levels)) + \
        sum(channels[i] * at[i + 1] for i in range(levels - 1))
    working = max(at[i] * max(3 * (channels[min(i + 1, levels - 1)] + channels[i]) + 2 * channels[i],
                              UNET_ATTENTION_COPIES * channels[i] if attention[i] else 0) for i in range(levels))
    return passes * (skips + working) * size


def transformer_width(config) -> int:
    """A transformer's hidden width from its config: heads x head size (DiT, MMDiT, Flux), or `dim` (Z-Image)."""
    if getattr(config, "dim", None):
        return int(config.dim)
    return int(config.num_attention_heads * config.attention_head_dim)


def decode_activations(vae, width: int, height: int, images: int, size: int, tile: int | None = None) -> int:
    """The VAE decoding `images` images at once (`tile`: in tiles of that many pixels a side), `size` bytes an element.

    The decoder peaks at full resolution, where the last-but-one block's channels C (256 in SD's, SDXL's, SD3's and
    Flux's VAEs) arrive upsampled: three C-wide maps alive at once (the block's input, its GroupNorm and activation):

        images * 3 C * width * height * size

    Tiled (diffusers' tiled_decode), a tile's maps instead, plus the decoded tiles kept for blending and the output
    being assembled, about 24 values a pixel (3 channels, tiles overlapping by a quarter, rows and output copies):

        images * (3 C * tile_width * tile_height + 24 * width * height) * size
    """
    config = vae.config
    channels = vae_channels(config)
    c = channels[1] if len(channels) > 1 else channels[0]
    if tile is None:
        return images * 3 * c * width * height * size
    return images * (3 * c * min(tile, width) * min(tile, height) + 24 * width * height) * size


def vae_channels(config) -> list[int]:
    """A VAE's channels by resolution level: block_out_channels (AutoencoderKL), decoder_block_out_channels (DC-AE),
    or base_dim x dim_mult (the video VAEs of Wan and Qwen-Image)."""
    channels = getattr(config, "block_out_channels", None) or getattr(config, "decoder_block_out_channels", None)
    return list(channels or [config.base_dim * m for m in config.dim_mult])


# -- The model, on the meta device ----------------------------------------------------------------------------------


@dataclass
class MetaModel:
    """A pipeline's components built from their configs on the meta device, and the family that runs it."""

    source: str
    family: object
    pipe: object  # the diffusers pipeline object holding the meta components (family members read it)
    components: list[Component]
    defaults: dict = field(default_factory=dict)  # a preset's defaults (width, height)

    def component(self, role: str) -> list[Component]:
        return [c for c in self.components if c.role == role]


def _reader(source: str, local: bool):
    """read(path inside the model) -> its JSON, or None when it is not there; a hub id's files come from the hub."""
    if local:
        def read(path: str):
            file = Path(source) / path
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
        return read
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def read_hub(path: str):
        try:
            return json.loads(Path(hf_hub_download(source, path)).read_text(encoding="utf-8"))
        except EntryNotFoundError as exc:
            if isinstance(exc, LocalEntryNotFoundError):  # offline and not cached: not an answer about the file
                raise
            return None
    return read_hub


def _component_class(library: str, name: str):
    try:
        module = importlib.import_module(library if library in ("diffusers", "transformers") else
                                         f"diffusers.pipelines.{library}")
    except ImportError:
        return None
    return getattr(module, name, None)


def meta_model(name_or_path: str | None = None, *, allow_pickle: bool = False) -> MetaModel:
    """The model a preset name, folder or hub id names, its components built from their configs on the meta device
    (a hub id reads only model_index.json and the config.json files from the hub)."""
    import torch

    from genkit import families, presets
    from genkit.loader import _locate, load_errors

    name = name_or_path or presets.DEFAULT_MODEL
    source, family, defaults, _ = _locate(name, allow_pickle)
    local = Path(source).exists()
    if family is not None and family.file_format != "diffusers":
        raise GenkitError(f"{name}: memory plans are made from a diffusers pipeline's configs, and {family.title} "
                          f"models are not diffusers pipelines", param="model")
    read = _reader(source, local)
    with load_errors(source, local):
        index = read("model_index.json")
        if index is None:
            raise GenkitError(f"{source} has no model_index.json", param="model")
        family = family or families.detect(index.get("_class_name"), source)
        pipeline_class = _component_class("diffusers", index.get("_class_name") or "")
        if pipeline_class is None:
            raise GenkitError(f"{source}: diffusers {_diffusers_version()} has no {index.get('_class_name')}",
                              param="model")
        built = {}
        for key, entry in index.items():
            if key.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or None in entry:
                continue
            built[key] = _build(key, *entry, read, torch)
    roles = {family.denoiser_name: "denoiser", "vae": "vae"}
    components = [count(key, "text" if key.startswith("text_encoder") else roles.get(key, "other"), module)
                  for key, module in built.items() if isinstance(module, torch.nn.Module)]
    accepted = inspect.signature(pipeline_class.__init__).parameters
    with warnings.catch_warnings(), _quiet_diffusers():
        warnings.simplefilter("ignore")
        pipe = pipeline_class(**{key: built.get(key) for key in accepted
                                 if key != "self" and accepted[key].kind is not inspect.Parameter.VAR_KEYWORD
                                 and (key in built or accepted[key].default is inspect.Parameter.empty)})
    if not any(c.role == "denoiser" for c in components):
        raise GenkitError(f"{source}: no {family.denoiser_name} config.json to plan from", param="model")
    return MetaModel(source, family, pipe, components, defaults)


def _build(key: str, library: str, class_name: str, read, torch):
    """Component `key` of class `library.class_name`: a torch model built from its config.json on the meta device,
    a scheduler with its defaults (it holds no weights), anything else (tokenizers, processors) None."""
    cls = _component_class(library, class_name)
    if not isinstance(cls, type):
        return None
    if issubclass(cls, torch.nn.Module):
        config = read(f"{key}/config.json")
        if config is None:
            raise GenkitError(f"{key}/config.json is missing: a {class_name} is built from it", param="model")
        with torch.device("meta"):  # not accelerate.init_empty_weights, which unties tied weights (T5's embeddings)
            if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # diffusers
                return cls.from_config(config)
            return cls(cls.config_class.from_dict(config))  # transformers
    if class_name.endswith("Scheduler"):
        return cls()
    return None


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


class _quiet_diffusers:
    """diffusers' logger at error level while the meta pipeline is put together (its safety-checker notice)."""

    def __enter__(self):
        from diffusers.utils import logging

        self.level = logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        from diffusers.utils import logging

        logging.set_verbosity(self.level)


def _tile(vae) -> int | None:
    """The side in pixels of the tiles the VAE decodes in when tiling is on (diffusers' tile_sample_min_size)."""
    tile = getattr(vae, "tile_sample_min_size", None)
    return int(tile[0] if isinstance(tile, (list, tuple)) else tile) if tile else None
