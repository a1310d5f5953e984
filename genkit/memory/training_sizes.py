"""What a LoRA run of a model weighs, for its memory plan (genkit.memory.training): the model as the plan reads it
(`TrainingModel`: a family's pipeline on the meta device, a loaded genkit-format pipeline, or a folder of configs genkit
has no family for), its adapters and blocks counted (peft's matching of `target_modules`, the blocks block swapping
moves), and the activations a training step keeps for its backward pass (`training_activations`: estimates, one
formula each for transformers and UNets, their constants read off the tiny models' saved tensors on the CPU).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from genkit.errors import GenkitError
from genkit.memory.sizes import (Component, MetaModel, Weight, _build, _reader, count, meta_model, text_activations,
                                 transformer_width, vae_channels)

# Activation constants, widths of one token (transformers) or latent pixel (UNets) kept for the backward pass. They
# were read off the tiny models in fp32 on the CPU at LoRA rank 1: the tensors saved for the backward pass
# (torch.autograd.graph.saved_tensors_hooks, each storage once, given to the innermost block running) per block:
# Flux's double block 13.4 and single block 12.3, SD3's joint block 11.1, PixArt 15.2, Z-Image 19.4, SANA 32
# (linear attention and convolutional feed-forward); a UNet's attention layer 29-33 and ResNet 6.8. The gradients in
# flight are the profiled peak (torch.profiler's memory events) less the saved tensors. tests/test_train_memory.py
# checks the whole estimate against that profiled peak for every tiny family.
TOKEN_WIDTHS = 16  # a transformer block, every token it sees (text tokens joined to the image's, as MMDiTs do)
BACKWARD_WIDTHS = 12  # gradients in flight during one block's backward (Flux 11.6, Z-Image 10.0)
UNET_ATTENTION_WIDTHS = 30  # a UNet's transformer layer (self- and cross-attention, GEGLU feed-forward)
UNET_RESNET_WIDTHS = 7  # a UNet's ResNet block (two GroupNorms and SiLUs)
# Bytes a saved activation element. In half precision autocast keeps norms, their outputs and the attention's
# statistics in fp32: on the tiny models under the CPU's bf16 autocast the saved bytes were 0.55 (SDXL) to 0.92
# (Z-Image, whose RMSNorms upcast) of fp32's, so an element is planned at 3 bytes, not 2 (CUDA's autocast was not
# measured). Without gradients (caching, sampling) an element is its dtype's size.
ACTIVATION_BYTES = {"fp32": 4, "bf16": 3, "fp16": 3}


# -- The model as the plan reads it ----------------------------------------------------------------------------------

@dataclass
class TrainingModel:
    """A pipeline's components (meta or loaded modules, counted), and what the plan reads of its family."""

    source: str
    family: str  # genkit's family name, or the pipeline class of a model genkit has no family for
    components: list  # Component each; roles "denoiser", "text", "vae", "other"
    latent_side: int  # pixels a side of one denoiser position (the VAE's factor, times a transformer's patch)
    vae_factor: int  # pixels a side of one latent pixel (1: no VAE)
    multiple: int  # the training side must be a multiple of this
    text_tokens: int  # caption tokens the denoiser reads (the family's cap, else CLIP's 77)
    default_resolution: int
    text_encoder_lora: bool = False  # the family can train text-encoder adapters
    guidance_passes: int = 2  # denoiser passes an image when sampling: 2 under classifier-free guidance
    quantizable: bool = True  # genkit.quantize can load its weights quantized (diffusers pipelines)
    attention_masked: bool = False  # its attention calls take a mask (Family.attention_masked)

    def role(self, role: str) -> list[Component]:
        return [c for c in self.components if c.role == role]

    @property
    def denoiser(self) -> Component:
        return self.role("denoiser")[0]


def training_model(model) -> TrainingModel:
    """A `TrainingModel` of a preset name, folder or hub id (its configs, on the meta device), a `MetaModel`, or a
    loaded `genkit.Pipeline` (its own modules: genkit-mini, which is no diffusers pipeline)."""
    if isinstance(model, TrainingModel):
        return model
    if hasattr(model, "pipe") and hasattr(model, "family") and not isinstance(model, MetaModel):
        return _from_pipeline(model)
    meta = model if isinstance(model, MetaModel) else meta_model(model)
    family, pipe = meta.family, meta.pipe
    return _of_family(meta.source, family, pipe, meta.components,
                      int(meta.defaults.get("width") or family.default_size(pipe)))


def _from_pipeline(pipeline) -> TrainingModel:
    import torch

    family, pipe = pipeline.family, pipeline.pipe
    roles = {family.denoiser_name: "denoiser", "vae": "vae"}
    components = [count(name, "text" if name.startswith("text_encoder") else roles.get(name, "other"), module)
                  for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)]
    return _of_family(pipeline.name, family, pipe, components, family.default_size(pipe))


def _of_family(source: str, family, pipe, components: list, resolution: int) -> TrainingModel:
    """What the plan reads of a family: a denoiser position is the VAE's factor times a transformer's patch (one
    pixel in pixel space), the caption's cap, guidance, whether genkit.quantize loads it."""
    vae = getattr(pipe, "vae", None)
    return TrainingModel(
        source, family.name, components, latent_side=family.latent_multiple(pipe) if family.latent else 1,
        vae_factor=_vae_factor(vae.config) if vae is not None else 1, multiple=family.multiple(pipe),
        text_tokens=family.max_sequence_length or 77, default_resolution=resolution,
        text_encoder_lora=family.text_encoder_lora, guidance_passes=2 if family.negative_prompt else 1,
        quantizable=family.file_format == "diffusers", attention_masked=family.attention_masked)


def from_configs(folder: str | Path, *, text_tokens: int = 512, resolution: int = 1024) -> TrainingModel:
    """A `TrainingModel` of a folder of configs (model_index.json and each model's config.json) whose pipeline genkit
    has no family for (Qwen-Image): its components built on the meta device by their classes, roles read off their
    names (unet or transformer, text_encoder*, vae), the VAE's factor from its config, `text_tokens` the caption cap."""
    import torch

    read = _reader(str(folder), True)
    index = read("model_index.json")
    if index is None:
        raise GenkitError(f"{folder} has no model_index.json", param="model")
    components = []
    for key, entry in index.items():
        if key.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or None in entry:
            continue
        module = _build(key, *entry, read, torch)
        if isinstance(module, torch.nn.Module):
            role = "denoiser" if key in ("unet", "transformer") else "text" if key.startswith("text_encoder") else \
                "vae" if key == "vae" else "other"
            components.append(count(key, role, module))
    vae = next((c for c in components if c.role == "vae"), None)
    denoiser = next((c for c in components if c.role == "denoiser"), None)
    if denoiser is None:
        raise GenkitError(f"{folder}: no unet or transformer config.json to plan from", param="model")
    factor = _vae_factor(vae.module.config) if vae is not None else 1
    patch = int(getattr(denoiser.module.config, "patch_size", 1) or 1)
    return TrainingModel(str(folder), index.get("_class_name") or "?", components, latent_side=factor * patch,
                         vae_factor=factor, multiple=factor * patch, text_tokens=text_tokens,
                         default_resolution=resolution)


def _vae_factor(config) -> int:
    """Pixels a side of one latent pixel: diffusers' vae_scale_factor (2 ** downsamplings)."""
    channels = getattr(config, "block_out_channels", None)
    if channels:
        return 2 ** (len(channels) - 1)
    return 2 ** len(getattr(config, "temperal_downsample", ()) or ())  # Wan's and Qwen-Image's video VAEs


# -- Counting: adapters, blocks -----------------------------------------------------------------------------------

def matches(name: str, targets) -> bool:
    """peft's matching of a module name against `target_modules` given as names: the name, or its ending."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_parameters(module, targets, rank: int) -> int:
    """Parameters peft's LoRA adds to `module` at `rank` for `targets`: r (in + out) a Linear, r (in k_h k_w + out)
    a convolution (lora_A takes the kernel, lora_B is 1x1)."""
    import torch

    total = 0
    for name, layer in module.named_modules():
        if not matches(name, targets):
            continue
        if isinstance(layer, torch.nn.Linear):
            total += rank * (layer.in_features + layer.out_features)
        elif isinstance(layer, torch.nn.Conv2d):
            kernel = layer.kernel_size[0] * layer.kernel_size[1]
            total += rank * (layer.in_channels // layer.groups * kernel + layer.out_channels)
    return total


def lora_layers(module, targets) -> int:
    """How many of `module`'s layers get adapters."""
    import torch

    return sum(1 for name, layer in module.named_modules()
               if matches(name, targets) and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)))


def blocks(module) -> list:
    """The blocks block swapping moves: each element of a transformer's top-level ModuleLists, in order (Flux's 19
    double and 38 single blocks, Z-Image's refiners and layers); none for a UNet (its blocks are few and uneven)."""
    import torch

    if hasattr(module, "down_blocks"):
        return []
    return [block for child in module.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def weights_of(module) -> list[Weight]:
    """`module`'s parameters as the plan counts them (its Linear matrices' rows, for quantized sizes)."""
    import torch

    rows = {id(m.weight): m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)}
    return [Weight(p.numel(), rows.get(id(p), 0)) for p in module.parameters()]


# -- Activations: estimates ----------------------------------------------------------------------------------------

def training_activations(denoiser, positions: int, text_tokens: int, batch: int, size: int, *,
                         checkpointing: bool, rank: int = 0, targets=(), masked: bool = False) -> int:
    """The activations one training step of `denoiser` keeps for its backward pass, at its peak, for `batch` latents
    of `positions` positions (latent pixels of a UNet, patches of a transformer), `size` bytes an element; each
    layer with a LoRA adapter (`targets`, at `rank`) keeps its r-wide hidden too.

    A transformer of L blocks and width D, T = positions + text tokens a sample (joined, as MMDiTs do; a
    cross-attention DiT's text only as keys and values, 2 T_text D a block), A adapted layers, keeps `TOKEN_WIDTHS`
    D a token a block and, in the backward of one block, `BACKWARD_WIDTHS` D of gradients:

        no checkpointing:  batch * T * (L * 16 D + 12 D + A r)
        checkpointing:     batch * T * (L * D + 16 D + 12 D + A r / L)   (each block's input, one block recomputed)

    A UNet keeps at each level l (positions P_l, channels C_l) `UNET_RESNET_WIDTHS` C_l a ResNet block and
    `UNET_ATTENTION_WIDTHS` C_l a transformer layer (plus 2 C_l a text token for cross-attention's keys and values),
    the adapted layers' r at the level's positions, and `BACKWARD_WIDTHS` at the finest level; checkpointed
    (diffusers checkpoints each ResNet and each Transformer2DModel), each unit's input and the largest unit's saved
    tensors.

    `masked`: the model masks its attention and its blocks take an `attention_mask`: each block makes a T x T mask
    of it (Chroma's blocks: `mask[:, None, None, :] * mask[:, None, :, None]`) and keeps it for the backward pass,
    L of them (one checkpointed). Attention itself is assumed fused (SDPA's flash or memory-efficient kernels: no
    T^2 scores kept).
    """
    if hasattr(denoiser, "down_blocks") and hasattr(denoiser, "up_blocks"):
        return batch * _unet_training(denoiser, positions, text_tokens, checkpointing, rank, targets) * size
    config = denoiser.config
    width = transformer_width(config)
    layers = max(1, len(blocks(denoiser)))
    cross = any(name.endswith("attn2") for name, _ in denoiser.named_modules())
    tokens = positions + (0 if cross else text_tokens)
    text = 2 * text_tokens * width if cross else 0
    lora = lora_layers(denoiser, targets) * rank * tokens
    block = TOKEN_WIDTHS * width * tokens + text
    backward = BACKWARD_WIDTHS * width * tokens
    if checkpointing:
        saved = layers * width * tokens + block + lora // layers
    else:
        saved = layers * block + lora
    square = masked and any("attention_mask" in inspect.signature(b.forward).parameters for b in blocks(denoiser))
    mask = (1 if checkpointing else layers) * tokens**2 if square else 0
    return batch * (saved + backward + mask) * size


def _unet_training(unet, positions: int, text_tokens: int, checkpointing: bool, rank: int, targets) -> int:
    """`training_activations` of a UNet, in elements, for one sample."""
    config = unet.config
    channels = list(config.block_out_channels)
    levels = len(channels)
    per_block = config.layers_per_block
    per_block = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * levels
    depth = getattr(config, "transformer_layers_per_block", 1) or 1
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * levels
    adapted = _adapted_by_level(unet, targets, levels)
    saved = units = largest = finest = 0
    for i in range(levels):
        at, c = positions // 4**i, channels[i]
        down = per_block[i] if hasattr(unet.down_blocks[i], "attentions") else 0
        up = per_block[i] + 1 if hasattr(unet.up_blocks[levels - 1 - i], "attentions") else 0
        resnets = 2 * per_block[i] + 1
        attention = depth[i] * (down + up)
        middle = (depth[-1] if hasattr(getattr(unet, "mid_block", None), "attentions") else 0) \
            if i == levels - 1 else 0
        lora = adapted[i] * rank * at
        saved += at * c * ((resnets + 2 * (i == levels - 1)) * UNET_RESNET_WIDTHS
                           + (attention + middle) * UNET_ATTENTION_WIDTHS) + attention * 2 * text_tokens * c + lora
        count = resnets + down + up + (2 + (1 if middle else 0) if i == levels - 1 else 0)
        units += at * c * count
        largest = max(largest, at * c * UNET_RESNET_WIDTHS + lora // count,
                      at * c * depth[i] * UNET_ATTENTION_WIDTHS + lora // count if down + up + middle else 0)
        finest = max(finest, at * c)
    if checkpointing:
        return units + largest + BACKWARD_WIDTHS * finest
    return saved + BACKWARD_WIDTHS * finest


def _adapted_by_level(unet, targets, levels: int) -> list[int]:
    """How many adapted layers each resolution level of a UNet holds (its down and up blocks; the middle block at
    the coarsest level; the rest at the finest)."""
    import torch

    counts = [0] * levels
    for name, layer in unet.named_modules():
        if not matches(name, targets) or not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            counts[int(parts[1])] += 1
        elif parts[0] == "up_blocks":
            counts[levels - 1 - int(parts[1])] += 1
        elif parts[0] == "mid_block":
            counts[-1] += 1
        else:
            counts[0] += 1
    return counts


def encode_activations(vae, width: int, height: int, images: int, size: int) -> int:
    """The VAE encoding `images` images at once, `size` bytes an element: its first block at full resolution, three
    maps of its first channels C alive at once (input, GroupNorm and activation), as decode_activations's decoder:

        images * 3 C * width * height * size
    """
    return images * 3 * vae_channels(vae.config)[0] * width * height * size


def text_training_activations(encoder, tokens: int, batch: int, size: int) -> int:
    """A text encoder trained with adapters: every layer's working set kept for the backward pass."""
    layers = getattr(encoder.config, "num_hidden_layers", None) or getattr(encoder.config, "num_layers", 1)
    return layers * text_activations(encoder, tokens, batch, size)
