"""A memory plan, made before loading: what a model needs on a device, and the fastest placement that fits.

Today's models do not fit the GPUs people own (Flux.1-dev: a 12B transformer, 22 GiB in bf16, and a 4.8B T5). This
module answers, from the model's configs alone, what each component weighs at each dtype and weight-only
quantization, what one denoising step and the VAE decode need on top, and which placement (everything on the GPU,
text encoders off it after encoding, diffusers' model, group or sequential offload, VAE slicing and tiling, a
smaller batch) is the fastest that fits a budget. Nothing is downloaded but configs and no weight is read: each
component is built on torch's meta device (shapes without storage), so a folder with only model_index.json and
each component's config.json is enough, on any machine (`genkit info --model M --device cuda --memory 12GiB`).

What is counted and what is estimated:

- **Weights are counted**: every parameter of every component at the plan's dtype (`FORMATS`), tied weights once,
  the modules a model keeps in fp32 at half precision (`_keep_in_fp32_modules`: T5's `wo` at fp16) in fp32.
- **Activations are estimates**, one formula each (`text_activations`, `step_activations`, `decode_activations`),
  each checked against the tensors alive during one forward pass traced on the meta device
  (`benchmarks/memory_table.py --trace`; the figures are in docs/memory.md). They assume a fused attention kernel
  (SDPA's flash or memory-efficient one, xformers): `--attention math` materialises batch x heads x tokens^2
  scores on top.
- **An allowance** (`CUDA_ALLOWANCE`) for what lies outside torch's tensors on a CUDA device.

The plan is data (`Plan`): its components (name, class, parameters, bytes, dtype, quantization, placement), the
placement's name, the predicted peak and whether it fits. What runs is a `Step` (placement, VAE mode, batch cap):
`apply` puts a pipeline in one with diffusers' calls (genkit.load, on CUDA), `next_step` is the one to retry a batch
with after running out of memory (the engine), `ran_out` the one line when that fails too. Quantizing is not done
here.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
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
    d = config.hidden_size
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
        width = config.num_attention_heads * config.attention_head_dim
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
    channels = list(getattr(config, "block_out_channels", None) or config.decoder_block_out_channels)
    c = channels[1] if len(channels) > 1 else channels[0]
    if tile is None:
        return images * 3 * c * width * height * size
    return images * (3 * c * min(tile, width) * min(tile, height) + 24 * width * height) * size


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


# -- Placements, from the fastest ------------------------------------------------------------------------------------

PLACEMENTS = {  # name -> (what it is, where each role's weights are)
    "gpu": ("everything on the GPU", {}),
    "text-encoders-offloaded": ("text encoders on the GPU to encode a run's prompts, then to the CPU before the "
                                "denoiser comes", {"text": "gpu to encode, then cpu"}),
    "model-offload": ("diffusers' enable_model_cpu_offload: each model on the GPU while it runs",
                      {"": "cpu; on the gpu while it runs"}),
    "group-offload": ("diffusers' enable_group_offload, block level, one block a group, with streams (the next "
                      "group is copied while one runs)", {"": "cpu; block groups on the gpu"}),
    "sequential-offload": ("diffusers' enable_sequential_cpu_offload: each layer on the GPU while it runs",
                           {"": "cpu; layer by layer on the gpu"}),
}
VAE_MODES = {"whole": "the batch decoded at once", "sliced": "one image at a time (enable_vae_slicing)",
             "tiled": "one image at a time, in tiles (enable_vae_slicing + enable_vae_tiling)"}
CUDA_ALLOWANCE = GiB  # not measured here: the CUDA context, cuBLAS/cuDNN workspaces, the caching allocator's slack


@dataclass(frozen=True)
class PlannedComponent:
    name: str
    cls: str
    parameters: int
    bytes: int  # its weights at `dtype` / `quantization`
    dtype: str
    quantization: str | None
    placement: str
    bytes_by_format: dict  # its weights at every dtype and quantization (FORMATS)


@dataclass(frozen=True)
class Plan:
    """The fastest placement that fits, and what it predicts (weights counted; activations estimated)."""

    model: str
    family: str
    device: str
    budget_bytes: int
    budget_from: str  # "given", or where the free memory was read
    width: int
    height: int
    asked_batch_size: int
    batch_size: int  # what the plan runs at a time (smaller than asked when nothing else fits)
    guidance_passes: int  # denoiser passes per image and step: 2 under classifier-free guidance
    components: list[PlannedComponent]
    placement: str
    vae: str  # VAE_MODES
    activations: dict  # bytes: text_encoding (the largest encoder), denoiser_step, vae_decode
    predicted_peak_bytes: int
    fits: bool

    def to_json(self) -> dict:
        """The plan as JSON: its fields, each component's class under "class"."""
        plan = asdict(self)
        plan["components"] = [{("class" if k == "cls" else k): v for k, v in c.items()} for c in plan["components"]]
        return plan


def plan(name_or_path: str | MetaModel | None = None, *, device: str | None = None, memory=None,
         width: int | None = None, height: int | None = None, batch_size: int = 1, dtype: str | None = None,
         quantize=None, allow_pickle: bool = False, step: "Step | None" = None) -> Plan:
    """The fastest placement of a model (a preset name, folder, hub id or `meta_model`) that fits `memory` (bytes or
    '12GiB'; default: what is free on `device` now), for `batch_size` images of `width` x `height` (default: the
    preset's or the family's size).

    `device` "cuda" plans for a GPU whether or not this machine has one (for a GPU not here, one that computes in
    bf16 natively); elsewhere everything stays in the one memory. `dtype`: the family's default on `device` unless
    given (genkit.loader.pick_dtype). `quantize`: plan weight-only quantized weights (`QUANTIZATIONS`): one name for
    the denoiser and text encoders, or {component: name}; genkit cannot quantize yet, so this is planning only.
    `step`: price that placement, VAE mode and batch (`Step`) instead of choosing (what a step that ran out of memory
    was predicted to need)."""
    from genkit import loader
    from genkit.checks import check_count, check_multiple

    model = name_or_path if isinstance(name_or_path, MetaModel) else meta_model(name_or_path, allow_pickle=allow_pickle)
    family, pipe = model.family, model.pipe
    device = _device(device)
    cuda = device.startswith("cuda")
    here = cuda and _cuda_here(device)
    torch_dtype = loader.pick_dtype(dtype, device, family, bf16=None if here else True)
    dtype_name = loader.SHORT[str(torch_dtype).removeprefix("torch.")]
    check_count(batch_size, "batch_size")
    multiple = family.multiple(pipe)
    width = check_multiple("width", width or model.defaults.get("width") or family.default_size(pipe), multiple)
    height = check_multiple("height", height or model.defaults.get("height") or family.default_size(pipe), multiple)
    budget, budget_from = _budget(memory, device, here)
    quantization = _quantization(quantize, model)

    vae = next(iter(model.component("vae")), None)
    upcast = vae is not None and family.vae_upcast(_with_vae_dtype(pipe, torch_dtype))
    dtypes = {c.name: "fp32" if c.role == "vae" and upcast else dtype_name for c in model.components}
    prices = Prices(model, dtypes, quantization, width, height, cuda)

    placements = [p for p in PLACEMENTS if model.component("text") or p != "text-encoders-offloaded"] if cuda \
        else ["device"]
    options = [(batch, placement, vae_mode) for batch in _batches(batch_size) for placement in placements
               for vae_mode in _vae_modes(batch, vae, width, height)]  # the fastest first
    if step is not None:
        options = [(step.batch or batch_size, step.placement if cuda else "device", step.vae)]
    priced = [(*option, prices.peak(option[1], acts := prices.activations(option[0], option[2])), acts)
              for option in options]
    batch, placement, vae_mode, need, acts = next((p for p in priced if p[3] <= budget), priced[-1])

    def where(c: Component) -> str:
        if placement == "device":
            return device
        spots = PLACEMENTS[placement][1]
        return spots.get(c.role) or spots.get("", "gpu")

    components = [PlannedComponent(c.name, c.cls, c.parameters, prices.weights[c.name], dtypes[c.name],
                                   quantization.get(c.name), where(c),
                                   {f: weight_bytes(c.weights, f if f in DTYPES else dtypes[c.name],
                                                    None if f in DTYPES else f) for f in FORMATS})
                  for c in model.components]
    summary = {name: max((acts[c.name] for c in model.components if c.role == role), default=0)
               for name, role in (("text_encoding", "text"), ("denoiser_step", "denoiser"), ("vae_decode", "vae"))}
    return Plan(model.source, family.name, device, budget, budget_from, width, height, batch_size, batch,
                prices.passes, components, placement, vae_mode, summary, need, need <= budget)


class Prices:
    """What each option of a plan costs: activations by component, weights on the device, the peak."""

    def __init__(self, model: MetaModel, dtypes: dict, quantization: dict, width: int, height: int, cuda: bool):
        family, pipe = model.family, model.pipe
        self.model, self.dtypes, self.quantization, self.width, self.height = model, dtypes, quantization, width, height
        self.allowance = CUDA_ALLOWANCE if cuda else 0
        self.weights = {c.name: self.at(c, c.weights) for c in model.components}
        self.passes = 2 if family.negative_prompt else 1  # classifier-free guidance doubles the denoiser's batch
        self.text_tokens = family.max_sequence_length or 77  # CLIP's 77 where the family sets no longer cap
        side = family.latent_multiple(pipe)  # pixels a side of one latent position (UNet) or patch (transformer)
        self.positions = (width // side) * (height // side)

    def at(self, c: Component, weights) -> int:
        return weight_bytes(weights, self.dtypes[c.name], self.quantization.get(c.name))

    def activations(self, batch: int, vae_mode: str) -> dict:
        """Each component's activations while it runs, for `batch` images, the VAE decoding per `vae_mode`."""
        acts = {}
        for c in self.model.components:
            size = FORMATS[self.dtypes[c.name]].bits // 8
            if c.role == "text":
                limit = getattr(c.module.config, "max_position_embeddings", None) or self.text_tokens
                acts[c.name] = text_activations(c.module, min(self.text_tokens, limit), batch, size)
            elif c.role == "denoiser":
                acts[c.name] = step_activations(c.module, self.positions, self.text_tokens, self.passes * batch, size)
            elif c.role == "vae":
                images = batch if vae_mode == "whole" else 1
                tile = _tile(c.module) if vae_mode == "tiled" else None
                acts[c.name] = decode_activations(c.module, self.width, self.height, images, size, tile)
            else:
                acts[c.name] = 0
        return acts

    def resident(self, c: Component, placement: str) -> int:
        """Bytes of `c`'s weights on the device while it runs under `placement`."""
        if placement == "group-offload":  # what no group holds, the running group and the next (streams)
            return self.at(c, c.ungrouped) + sum(sorted((self.at(c, g) for g in c.groups), reverse=True)[:2])
        if placement == "sequential-offload":
            return max((self.at(c, layer) for layer in c.layers), default=0)
        return self.weights[c.name]

    def peak(self, placement: str, acts: dict) -> int:
        """The predicted peak of `placement`: the weights on the device at the worst moment, what runs then, the
        allowance."""
        texts = [c for c in self.model.components if c.role == "text"]
        rest = [c for c in self.model.components if c.role != "text"]

        def together(components) -> int:  # these on the device at once, the largest activations among them
            return sum(self.weights[c.name] for c in components) + max((acts[c.name] for c in components), default=0)

        if placement in ("gpu", "device"):
            need = together(self.model.components)
        elif placement == "text-encoders-offloaded":
            need = max(together(texts), together(rest))
        else:  # one model at a time, each with what its placement keeps of it
            need = max(self.resident(c, placement) + acts[c.name] for c in self.model.components)
        return need + self.allowance


def _device(device: str | None) -> str:
    """`device` as planned: cpu, mps, cuda or cuda:N, whether or not this machine has it; None: the best one here."""
    if device is None:
        from genkit.loader import pick_device

        return pick_device(None)
    kind = str(device).split(":")[0]
    index = str(device)[len(kind) + 1:]
    if kind not in ("cpu", "cuda", "mps") or (":" in str(device) and not index.isdigit()):
        raise GenkitError(f"{device}: plans are made for cpu, cuda, cuda:N or mps", param="device")
    return str(device)


def _cuda_here(device: str) -> bool:
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    return torch.cuda.is_available() and index < torch.cuda.device_count()


def _budget(memory, device: str, here: bool) -> tuple[int, str]:
    if memory is not None:
        return (memory if isinstance(memory, int) else parse_bytes(memory)), "given"
    if device.startswith("cuda") and not here or device.startswith("mps"):
        raise GenkitError(f"is needed: there is no {device} here to ask for its free memory (give the budget, like "
                          f"24GiB)", param="memory")
    from genkit.cpu import available_memory

    free = available_memory(device)
    if free is None:
        raise GenkitError(f"is needed: the free memory of {device} is not known here (give the budget, like 24GiB)",
                          param="memory")
    return free, f"free on {device} now"


def _quantization(quantize, model: MetaModel) -> dict:
    """{component: quantization} of `quantize` (one name: the denoiser and the text encoders)."""
    if not quantize:
        return {}
    if isinstance(quantize, str):
        quantize = {c.name: quantize for c in model.components if c.role in ("denoiser", "text")}
    names = {c.name for c in model.components}
    for name, scheme in quantize.items():
        if name not in names or scheme not in QUANTIZATIONS:
            raise GenkitError(f"{name}={scheme}: quantize one of {', '.join(sorted(names))} with one of "
                              f"{', '.join(QUANTIZATIONS)}", param="quantize")
    return dict(quantize)


def _with_vae_dtype(pipe, torch_dtype):
    """The meta pipeline with its VAE in `torch_dtype` (what family.vae_upcast reads)."""
    with _quiet_diffusers():  # its note on modules kept in fp32 is for loading weights; here none are
        pipe.vae.to(torch_dtype)
    return pipe


def _tile(vae) -> int | None:
    """The side in pixels of the tiles the VAE decodes in when tiling is on (diffusers' tile_sample_min_size)."""
    tile = getattr(vae, "tile_sample_min_size", None)
    return int(tile[0] if isinstance(tile, (list, tuple)) else tile) if tile else None


def _batches(batch: int) -> list[int]:
    """The asked batch, then halved (rounding up) down to 1."""
    sizes = [batch]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def _vae_modes(batch: int, vae: Component | None, width: int, height: int) -> list[str]:
    """The VAE modes worth trying, cheapest first: slicing only helps a batch, tiling only an image past a tile."""
    if vae is None:
        return ["whole"]
    modes = ["whole"] + (["sliced"] if batch > 1 else [])
    tile = _tile(vae.module) if hasattr(vae.module, "enable_tiling") else None
    return modes + (["tiled"] if tile and max(width, height) > tile else [])


# -- Reading a plan --------------------------------------------------------------------------------------------------

def describe(plan: Plan) -> str:
    """The plan as `genkit info --model` prints it: each component with its bytes, dtype and placement, the
    activations, the placement and the predicted peak; then every component's bytes at each quantization."""
    passes = "two denoiser passes an image (classifier-free guidance)" if plan.guidance_passes == 2 else \
        "one denoiser pass an image (no classifier-free guidance)"
    batch = f"batch {plan.batch_size}" + (f" (asked {plan.asked_batch_size}: a smaller batch is what fits)"
                                          if plan.batch_size != plan.asked_batch_size else "")
    lines = [f"memory plan for {plan.model} ({plan.family}) on {plan.device}, from its configs alone "
             f"(weights counted, activations estimated)",
             f"budget       {gib(plan.budget_bytes)} ({plan.budget_from})",
             f"image        {plan.width}x{plan.height}, {batch}, {passes}", ""]
    rows = [("component", "class", "parameters", "bytes", "dtype", "placement")]
    for c in plan.components:
        dtype = c.dtype + (f", {c.quantization}" if c.quantization else "")
        count = f"{c.parameters / 1e9:.2f}B" if c.parameters >= 1e9 else f"{c.parameters / 1e6:.1f}M"
        rows.append((c.name, c.cls, count, gib(c.bytes), dtype, c.placement))
    lines += _table(rows) + [""]
    acts = plan.activations
    lines.append(f"activations  text encoding {gib(acts['text_encoding'])}, one denoiser step "
                 f"{gib(acts['denoiser_step'])}, VAE decode {gib(acts['vae_decode'])} (estimates)")
    placement = PLACEMENTS[plan.placement][0] if plan.placement in PLACEMENTS else f"everything on {plan.device}"
    lines.append(f"placement    {plan.placement}: {placement}; VAE {plan.vae}: {VAE_MODES[plan.vae]}")
    verdict = "fits" if plan.fits else "does not fit, even with the least memory genkit knows how to plan"
    lines.append(f"peak         {gib(plan.predicted_peak_bytes)} predicted of {gib(plan.budget_bytes)}: {verdict}")
    lines += ["", "weights at each dtype and weight-only quantization (Linear weight matrices quantized, the rest "
              "at the component's dtype; genkit does not quantize yet):"]
    rows = [("component", *FORMATS)] + [(c.name, *(gib(c.bytes_by_format[f]) for f in FORMATS))
                                         for c in plan.components]
    return "\n".join(lines + _table(rows))


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]


# -- Applying a plan, and the step after running out of memory -------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """What runs: a placement (`PLACEMENTS`, or "device": as loaded, no plan), a VAE mode (`VAE_MODES`), at most
    `batch` images a call (None: as asked), and what chose it ("plan", "flags", or "retry": after running out of
    memory)."""

    placement: str = "device"
    vae: str = "whole"
    batch: int | None = None
    by: str = "plan"

    def label(self) -> str:
        """What records and stderr say: "model-offload, VAE tiled", "none" (nothing applied)."""
        parts = [] if self.placement == "device" else [self.placement]
        parts += [f"VAE {self.vae}"] if self.vae != "whole" else []
        parts += [f"batch {self.batch}"] if self.batch else []
        text = ", ".join(parts) or "none"
        return text + {"flags": " (flags)", "retry": " (after running out of memory)"}.get(self.by, "")


def step_of(plan: Plan) -> Step:
    """The step a plan chose (its smaller batch, when it had to, as a cap)."""
    return Step(plan.placement, plan.vae, plan.batch_size if plan.batch_size < plan.asked_batch_size else None)


def apply(pipe, step: Step, device: str) -> None:
    """Put diffusers pipeline `pipe` in `step` on `device` (its onload device: "cuda", "cuda:1"; "cpu" runs the same
    calls where diffusers allows, for tests), undoing an earlier step's offload first:

    - gpu / device: `pipe.to(device)`;
    - text-encoders-offloaded: each text encoder kept on the CPU and moved to `device` when it encodes (accelerate's
      `cpu_offload_with_hook`, the hook diffusers' model offload uses), in a ring with the denoiser: an encoder
      starting moves the denoiser off, the denoiser starting moves the encoders off; the VAE stays on `device`;
    - model-offload: `pipe.enable_model_cpu_offload(device=device)`;
    - group-offload: `pipe.enable_group_offload(device, offload_type="block_level", num_blocks_per_group=1,
      use_stream=True)` (streams on CUDA only), diffusers' own hooks on its models, `apply_group_offloading` on the
      others (transformers' text encoders);
    - sequential-offload: `pipe.enable_sequential_cpu_offload(device=device)`;
    - VAE sliced: `vae.enable_slicing()`; tiled: slicing and `vae.enable_tiling()`.
    """
    import torch

    _undo_offload(pipe, device)
    if step.placement in ("gpu", "device"):
        pipe.to(device)
    elif step.placement == "text-encoders-offloaded":
        _offload_text_encoders(pipe, device)
    elif step.placement == "model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif step.placement == "group-offload":
        pipe.enable_group_offload(torch.device(device), offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=torch.device(device).type == "cuda")
    elif step.placement == "sequential-offload":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"no placement {step.placement!r}")
    vae = getattr(pipe, "vae", None)
    if vae is not None and step.vae in ("sliced", "tiled"):
        vae.enable_slicing()
    if vae is not None and step.vae == "tiled":
        vae.enable_tiling()


def _modules(pipe) -> dict:
    import torch

    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _undo_offload(pipe, device: str) -> None:
    """Remove accelerate's offload hooks and diffusers' group offloading, the weights back on the CPU (the next
    placement moves them from there)."""
    hooked = False
    for component in _modules(pipe).values():
        for module in component.modules():  # group offloading hooks the blocks, and the model itself only at times
            registry = getattr(module, "_diffusers_hook", None)
            for name in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
                if registry is not None and registry.get_hook(name) is not None:
                    registry.remove_hook(name, recurse=False)
                    hooked = True
        hooked = hooked or hasattr(component, "_hf_hook")
    if hooked:
        pipe.remove_all_hooks()
        pipe.to("cpu")


def _offload_text_encoders(pipe, device: str) -> None:
    from accelerate import cpu_offload_with_hook

    modules = _modules(pipe)
    encoders = [m for name, m in modules.items() if name.startswith("text_encoder")]
    for name, module in modules.items():
        if not name.startswith("text_encoder"):
            module.to(device)
    denoiser = next((m for name, m in modules.items() if name in ("unet", "transformer")), None)
    hooks = []
    for encoder in encoders:
        _, hook = cpu_offload_with_hook(encoder, device, prev_module_hook=hooks[-1] if hooks else None)
        hooks.append(hook)
    if denoiser is not None and hooks:
        _, ring = cpu_offload_with_hook(denoiser, device, prev_module_hook=hooks[-1])
        denoiser.to(device)  # on the device from the start; the next encoding moves it off
        hooks[0].hook.prev_module_hook = ring


def next_step(step: Step, where: str, batch: int, pipe, width: int, height: int, cuda: bool) -> Step | None:
    """The step to retry a batch of `batch` images with after it ran out of memory `where` ("decode": every denoising
    step had run; else "denoise"), in the planner's order: for a decode the next VAE mode (sliced for a batch, then
    tiled where the image is larger than a tile), then on CUDA the next placement (`PLACEMENTS`, from the current),
    then half the batch; None when nothing is left."""
    vae = getattr(pipe, "vae", None)
    if where == "decode" and vae is not None:
        modes = ["whole"] + (["sliced"] if batch > 1 else [])
        tile = _tile(vae) if hasattr(vae, "enable_tiling") else None
        modes += ["tiled"] if tile and max(width, height) > tile else []
        later = modes[modes.index(step.vae) + 1:] if step.vae in modes else []
        if later:
            return replace(step, vae=later[0], by="retry")
    if cuda:
        names = [p for p in PLACEMENTS if p != "text-encoders-offloaded" or
                 any(name.startswith("text_encoder") for name in _modules(pipe))]
        at = names.index(step.placement) if step.placement in names else 0
        if at + 1 < len(names):
            return replace(step, placement=names[at + 1], by="retry")
    if batch > 1:
        return replace(step, batch=(batch + 1) // 2, by="retry")
    return None


class RanOut(Exception):
    """A batch ran out of memory (torch.OutOfMemoryError) `where`: "decode" or "denoising" (text encoding included)."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


class OutOfMemory(GenkitError):
    """A batch ran out of memory twice (its step, then the next): the CLI's one line and exit 2, the server's 507."""


def ran_out(pipeline, step: Step, jobs: list, meta: "MetaModel | None", budget=None) -> OutOfMemory:
    """The one line for a batch that ran out of memory with `step` too: what the planner estimates that step needs,
    and what would fit (a smaller batch, a quantization, a budget closer to what is really free)."""
    from genkit.errors import term

    first = jobs[0]
    what = f"{len(jobs)} image(s) of {first.width}x{first.height}"
    if meta is None and pipeline.kind == "diffusers":  # no plan was applied (a CPU): the estimate still helps
        try:
            meta = meta_model(pipeline.name)
        except GenkitError:
            pass
    if meta is None:
        return OutOfMemory(f"out of memory on {pipeline.device} making {what}, also with {step.label()} (this model "
                           f"has no memory plan: it is made from a diffusers pipeline's configs); pass a smaller "
                           f"{term('batch_size')} or size")
    from genkit.loader import SHORT

    dtype = SHORT[str(pipeline.dtype).removeprefix("torch.")]
    size = {"device": pipeline.device, "memory": budget, "width": first.width, "height": first.height,
            "dtype": dtype}
    need = plan(meta, batch_size=len(jobs), step=step, **size)
    fits = []
    if len(jobs) > 1 and (smaller := plan(meta, batch_size=1, **size)).fits:
        fits.append(f"{term('batch_size')} 1 (plan {smaller.placement}, {gib(smaller.predicted_peak_bytes)})")
    for scheme in ("int8", "nf4"):
        if (quantized := plan(meta, batch_size=len(jobs), quantize=scheme, **size)).fits:
            fits.append(f"--quantize {scheme} ({gib(quantized.predicted_peak_bytes)})")
            break
    fits.append(f"{term('memory')} with what is really free on this {pipeline.device} (this plan took "
                f"{gib(need.budget_bytes)}, {need.budget_from}), so it starts from more offload")
    return OutOfMemory(f"out of memory on {pipeline.device} making {what}, also with {step.label()}: the plan "
                       f"estimates {gib(need.predicted_peak_bytes)} for that step; what would fit: "
                       f"{'; '.join(fits)} (nothing of this batch was saved)")

