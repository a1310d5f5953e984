"""The LoRA recipe: its sections, its defaults per model family, and how a run's recipe is resolved.

A run's recipe is built in layers, each over the one before:

1. the generic defaults (the dataclasses below; `[lora]`, `[data]`, ... of configs/lora.toml);
2. the base model's family table in configs/lora.toml (`[families.genkit-mini.train]` ...): the
   recipe measured or chosen for that family, with the reasons written beside each value;
3. the user's recipe file (`--config`), if any, with its own `[families.<name>.*]` tables;
4. `--set section.key=value` overrides, and `--instance-prompt`.

The family is known only once the model is loaded, so `resolve` runs twice: before the load without
a family (every user value checked before the slow part) and after it with the family.
A `LoraRecipe` object passed by a library caller is used as it is.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field, replace
from pathlib import Path

from genkit.checks import DEFAULT_MAX_SIDE, DEFAULT_MAX_STEPS, MAX_SEED
from genkit.config import apply_overrides, build, check_ranges, number, read_toml, to_dict

PLACEMENT = {"device", "threads", "mixed_precision"}  # decided before the model (and so its family) is loaded
SHIPPED = "lora"  # configs/lora.toml: the generic defaults and every family's table
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")


class Precision(enum.Enum):
    AUTO = "auto"  # fp32 on a CPU; bf16 on a GPU that has it, else fp16
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class PriorSource(enum.Enum):
    RENDER = "render"  # scenes of genkit-mini's training world, drawn by genkit.data.shapes
    MODEL = "model"  # the base model's own images of the class captions (DreamBooth's class images)
    NONE = "none"


class PriorTarget(enum.Enum):
    BASE = "base"  # the base model's own prediction on the prior image (adapters off): the LoRA learns to leave it
    IMAGES = "images"  # the prior image's own noise target, as for the concept's images (DreamBooth)


class Schedule(enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"


class TimestepSampling(enum.Enum):
    """diffusers' `weighting_scheme` of its SD3/Flux scripts (genkit.train.objectives)."""

    AUTO = "auto"  # the family's own: logit-normal sigmas for flow matching, uniform timesteps for noise prediction
    UNIFORM = "uniform"
    LOGIT_NORMAL = "logit_normal"  # sigmoid of a normal draw (train.logit_mean, train.logit_std): SD3's rf/lognorm
    MODE = "mode"  # SD3's mode sampling with heavy tails (train.mode_scale)
    COSMAP = "cosmap"  # uniform sigmas, the loss weighted as the cosine-map density would draw them
    SIGMA_SQRT = "sigma_sqrt"  # uniform sigmas, the loss weighted by sigma^-2


class AdapterKind(enum.Enum):
    LORA = "lora"  # low-rank A, B (Hu et al. 2021); with lora.dora, DoRA
    LOKR = "lokr"  # Kronecker-product factors (LyCORIS' LoKr, peft's LoKrConfig)
    LOHA = "loha"  # Hadamard product of two low-rank pairs (LyCORIS' LoHa, peft's LoHaConfig)


def _choice(enum_type, value, key: str):
    try:
        return enum_type(value)
    except ValueError:
        valid = ", ".join(e.value for e in enum_type)
        raise ValueError(f"{key} must be one of {valid}, got {value!r}") from None


@dataclass
class AdapterConfig:
    rank: int = number(8, 1)  # LoRA rank r: the width of the low-rank update
    alpha: float = number(8.0, 0, low_open=True)  # the update is scaled by alpha / rank
    dropout: float = number(0.0, 0, 1, high_open=True)  # dropout on the adapter's input
    target_modules: tuple = ("to_q", "to_k", "to_v", "to_out.0")  # decoder layers that get adapters
    text_encoder: bool = False  # also train adapters on the text encoder (SD-family only; no caption cache then)
    text_encoder_target_modules: tuple = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention projections
    adapter: str = "lora"  # lora, lokr or loha (peft's LoraConfig, LoKrConfig, LoHaConfig)
    dora: bool = False  # DoRA (Liu et al. 2024): the update split into direction and magnitude (adapter = lora)

    def __post_init__(self):
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one layer, e.g. [\"to_q\", \"to_v\"]")
        kind = _choice(AdapterKind, self.adapter, "lora.adapter")
        if self.dora and kind is not AdapterKind.LORA:
            raise ValueError(f"lora.dora decomposes a LoRA's update, and lora.adapter is {kind.value}; set "
                             "lora.dora=false or lora.adapter=lora")
        if kind is not AdapterKind.LORA and self.dropout:
            raise ValueError(f"lora.dropout is a LoRA's input dropout, which peft's {kind.value} has not; set "
                             "lora.dropout=0")
        if kind is not AdapterKind.LORA and self.text_encoder:
            raise ValueError(f"lora.text_encoder trains LoRA adapters only; set lora.text_encoder=false or "
                             "lora.adapter=lora")


@dataclass
class DataConfig:
    # training size in pixels (buckets hold about its square in pixels); 0 is the model's own (512 for SD 1.x,
    # 32 for genkit-mini)
    resolution: int = number(0, 0, DEFAULT_MAX_SIDE)
    resolutions: tuple = ()  # several training sizes, e.g. [512, 768, 1024]: every image trains at each one
    buckets: bool = True  # aspect-ratio buckets: images keep their shape (square images train as without them)
    bucket_step: int = number(0, 0, DEFAULT_MAX_SIDE)  # px between bucket sides; 0: 64, finer below 512 px
    bucket_max_ratio: float = number(2.0, 1)  # a bucket's longer side at most this times its shorter
    instance_prompt: str = ""  # caption for images that have none (DreamBooth style); also --instance-prompt
    random_crop: bool = False  # random instead of centre crops (needs cache_latents = false)
    flip: bool = False  # mirror half the images, a fresh choice each epoch
    cache_latents: bool = True  # encode each image variant once, not every step
    trigger_words: tuple = ()  # the words that name the new concept; empty: found in the captions (see priors)
    caption_dropout: float = number(0.0, 0, 1, high_open=True)  # share of samples trained on the empty caption
    shuffle_caption: bool = False  # shuffle comma-separated tags every sample (the text encoder then runs every step)
    keep_tokens: int = number(0, 0)  # leading tags shuffle_caption leaves in place (the trigger words)
    masks: bool = True  # apply NAME.mask.png loss masks where they are (white: trained, black: ignored)

    def __post_init__(self):
        if self.random_crop and self.cache_latents:
            raise ValueError("data.random_crop gives a new crop every step, so it cannot be cached: "
                             "also set data.cache_latents=false")
        for size in self.resolutions:
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= DEFAULT_MAX_SIDE:
                raise ValueError(f"data.resolutions must list sizes in pixels from 1 to {DEFAULT_MAX_SIDE}, got {size!r}")
        if len(set(self.resolutions)) != len(self.resolutions):
            raise ValueError(f"data.resolutions lists a size twice: {list(self.resolutions)}")
        if self.resolutions and self.resolution and self.resolution not in self.resolutions:
            raise ValueError(f"data.resolution = {self.resolution} is not one of data.resolutions = "
                             f"{list(self.resolutions)} (set data.resolution = 0 or add it)")

    @property
    def sizes(self) -> tuple[int, ...]:
        """The training sizes: `resolutions`, else `resolution` alone."""
        return tuple(self.resolutions) or (self.resolution,)

    @property
    def caption_every_step(self) -> bool:
        """Whether captions change from sample to sample beyond the cache (shuffled tags): encoded every step."""
        return self.shuffle_caption


@dataclass
class TrainConfig:
    steps: int = number(1000, 1)  # optimizer steps
    batch_size: int = number(1, 1)  # images per process per forward pass
    gradient_accumulation_steps: int = number(4, 1)  # forward passes per optimizer step
    learning_rate: float = number(1e-4, 0, low_open=True)  # peak, after warm-up
    lr_scheduler: str = "constant"  # constant or cosine (decay to 0 at the last step)
    warmup_steps: int = number(0, 0)  # linear warm-up from 0
    weight_decay: float = number(1e-2, 0, 1)  # AdamW's decoupled weight decay
    max_grad_norm: float = number(1.0, 0)  # gradient clipping; 0 turns it off
    seed: int = number(0, 0, MAX_SEED)  # decides data order, flips, noise and the adapters' initial weights
    mixed_precision: str = "auto"  # auto (fp32 on CPU; bf16, else fp16, on GPU), fp32, fp16 or bf16
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower
    device: str = "auto"  # auto (what accelerate picks) or cpu
    threads: int = number(0, 0)  # torch CPU threads; 0 keeps torch's default
    checkpoint_every: int = number(250, 1)  # steps between checkpoints (the last step always gets one)
    keep_checkpoints: int = number(2, 1)  # newest complete checkpoints kept
    timestep_sampling: str = "auto"  # auto, uniform, logit_normal, mode, cosmap or sigma_sqrt (flow matching)
    logit_mean: float = number(0.0, -10, 10)  # logit_normal: the normal's mean (SD3: 0)
    logit_std: float = number(1.0, 0, 10, low_open=True)  # logit_normal: the normal's standard deviation (SD3: 1)
    mode_scale: float = number(1.29, -1, 1.75)  # mode: SD3's scale s (1.29; a density from -1 to 2 / (pi - 2))
    flow_shift: float = number(1.0, 0, 100, low_open=True)  # flow matching: sigma shifted as SD3's scheduler; 1: none
    snr_gamma: float = number(0.0, 0, 100)  # min-SNR weighting's gamma for noise prediction (5 is usual); 0 off
    ema: bool = False  # keep an exponential moving average of the adapter weights; it is what gets exported
    ema_decay: float = number(0.999, 0, 1, high_open=True)  # its decay (diffusers' EMAModel warm-up below it)
    log_with: str = "none"  # a loss-curve tracker accelerate drives: tensorboard, wandb, ... (OUT/logs); none

    def __post_init__(self):
        _choice(Schedule, self.lr_scheduler, "train.lr_scheduler")
        _choice(TimestepSampling, self.timestep_sampling, "train.timestep_sampling")
        if self.log_with not in ("none", *TRACKERS):
            raise ValueError(f"train.log_with must be none or one of accelerate's trackers ({', '.join(TRACKERS)}), "
                             f"got {self.log_with!r}")
        _choice(Precision, self.mixed_precision, "train.mixed_precision")
        if self.device not in ("auto", "cpu"):
            raise ValueError(f"train.device must be auto or cpu, got {self.device!r}")


@dataclass
class ValidationConfig:
    every: int = number(250, 0)  # steps between sample grids (and one at the end); 0 turns them off
    prompts: tuple = ()  # empty: the instance prompt, else the first 4 distinct captions
    seed: int = number(0, 0, MAX_SEED)  # image i gets seed + i, so grids from different steps compare
    num_inference_steps: int = number(20, 1, DEFAULT_MAX_STEPS)  # denoising steps per sample


@dataclass
class PriorConfig:
    source: str = "model"  # render (genkit-mini's own world), model (the base model's images) or none
    images: int = number(100, 0)  # prior images, made once into OUT/priors
    fraction: float = number(0.5, 0, 1, high_open=True)  # share of every batch that is prior images
    batch_size: int = number(4, 1)  # images per generation batch while making model priors
    target: str = "images"  # what the prior images are trained toward: images (DreamBooth) or base (the base's prediction)
    weight: float = number(1.0, 0, low_open=True)  # a prior row's loss against a concept row's (prior_loss_weight)
    # share of the concept's rows shown with an empty caption and trained as prior rows
    unconditional: float = number(0.0, 0, 1, high_open=True)

    def __post_init__(self):
        _choice(PriorSource, self.source, "prior.source")
        _choice(PriorTarget, self.target, "prior.target")

    @property
    def active(self) -> bool:
        return PriorSource(self.source) is not PriorSource.NONE and self.images > 0 and self.fraction > 0


@dataclass
class LoraRecipe:
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`, section by section (a value in `top` replaces the same key in `base`)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _layers(raw: dict, family: str | None) -> dict:
    """A recipe file's sections with its table for `family` on top; the `families` key itself dropped."""
    tables = raw.get("families", {})
    if not isinstance(tables, dict):
        from genkit.errors import GenkitError

        raise GenkitError("families in a recipe must be a table of [families.<family>.<section>] tables")
    sections = {k: v for k, v in raw.items() if k != "families"}
    table = tables.get(family, {}) if family else {}
    placed = sorted(set(table.get("train", {})) & PLACEMENT)
    if placed:  # the model is loaded on these before the family is known
        from genkit.errors import GenkitError

        raise GenkitError(f"train.{placed[0]} cannot be set per family ([families.{family}.train]); set it in [train]")
    return _merge(sections, table)


def shipped_path() -> Path:
    from genkit.presets import packaged_dir

    return Path(str(packaged_dir("_configs", "configs").joinpath(f"{SHIPPED}.toml")))


def layered(cls, shipped: Path, config, overrides=(), family: str | None = None):
    """A recipe of dataclass `cls`: the `shipped` file's sections with `family`'s table, then `config`'s file (or
    `config` itself, a `cls` object), then `section.key=value` overrides."""
    if isinstance(config, cls):
        recipe = build(cls, apply_overrides(to_dict(config), overrides)) if overrides else config
        check_ranges(recipe)  # a caller's own object: its numbers checked as a file's are
        return recipe
    raw = _layers(read_toml(shipped), family)
    if config is not None and Path(config).resolve() != shipped.resolve():
        raw = _merge(raw, _layers(read_toml(config), family))
    return build(cls, apply_overrides(raw, overrides))


def resolve(config: LoraRecipe | str | Path | None = None, overrides=(), instance_prompt: str | None = None,
            family: str | None = None) -> LoraRecipe:
    """The run's recipe: shipped defaults (with `family`'s table), then `config`'s file, then `overrides`."""
    recipe = layered(LoraRecipe, shipped_path(), config, overrides, family)
    if instance_prompt is not None:
        recipe = replace(recipe, data=replace(recipe.data, instance_prompt=instance_prompt))
    return recipe


def load_recipe(path: str | Path | None, overrides=(), family: str | None = None) -> LoraRecipe:
    """The recipe of a file (None: the shipped defaults) for `family`, with `section.key=value` overrides."""
    return resolve(path, overrides, family=family)
