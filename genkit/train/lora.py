"""LoRA fine-tuning on a folder of your images (`genkit train lora`, `genkit.train_lora`).

The base model stays frozen; peft adds low-rank adapters (Hu et al. 2021,
https://arxiv.org/abs/2106.09685) to the decoder's attention projections, and optionally to the
text encoder's. accelerate owns the device, the precision (fp32 on a CPU, fp16 or bf16 autocast
on a GPU, with the adapters kept in fp32), gradient accumulation and multi-process runs.

Frozen parts are run once, not every step: each distinct caption is embedded once (unless the
text encoder is being trained), and each image variant is encoded once, into the VAE's latent
distribution (mean, std) for SD-family models and into pixels for genkit-mini. A variant is an
image as training sees it: in its aspect-ratio bucket (genkit.data.buckets: images keep their shape, every batch
draws from one bucket; square images train exactly as without buckets), centre-cropped, and mirrored or not when
`data.flip` is on (so at most two per image and bucket). Random crops give a new variant every step, so
`data.random_crop` needs `data.cache_latents = false`, which encodes each batch as it comes (train/encoders.py).
A sample's caption may be dropped (`data.caption_dropout`) or have its tags shuffled (`data.shuffle_caption`,
genkit.data.captions), a seeded choice per sample; an image's loss mask (`NAME.mask.png`) weights its loss on the
latent grid (white: trained, black: ignored), as kohya's masked loss does.

A run is a pure function of (seed, step): the epoch's image order and flips, each step's
latent sample, noise and timesteps come from generators seeded by them, the dropout RNG is
reseeded every step, and the learning rate is a function of the step (train/sampling.py, train/shared.py). So a run resumed from a
checkpoint ends with the same weights as an unbroken one. Checkpoints (adapter weights,
optimizer and loss-scaler state) are written atomically and rotated afterwards; a NaN or
infinite loss stops the run in that step, before anything is written.

Memory: before loading, the run is planned (genkit.memory.training: the frozen base, the adapters, their
gradients and optimizer states, the caches, the activations) and the cheapest steps that fit are taken on CUDA:
gradient checkpointing, the text encoders and VAE off the GPU once the caches are made, 8-bit AdamW, a quantized
base (through genkit.quantize), block swapping. On a CPU the plan is printed and nothing changes, unless `memory`
plans the process's RAM (checkpointing and an int8 base apply there). `plan_memory` is `--dry-run`'s plan.

Output, in OUT_DIR: `pytorch_lora_weights.safetensors` in diffusers' layout (keys
`unet.<layer>.lora.down.weight`, rank and alpha in the header), which plain diffusers loads
with `pipe.load_lora_weights(OUT_DIR)`, and `genkit_lora.json`, the record of how it was made.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genkit.config import to_dict
from genkit.errors import GenkitError, term
from genkit.lora import WEIGHTS_NAME, text_encoder_problem
from genkit.train import adapters, checkpoint, objectives, priors, shared
from genkit.train.encoders import Encoders
from genkit.train.sampling import RunData, Streams, batch_items, plan_data, sample_index  # noqa: F401
from genkit.train.recipe import (  # noqa: F401  (the recipe's names, as callers of this module knew them)
    AdapterConfig, DataConfig, LoraRecipe, Precision, PriorConfig, PriorSource, PriorTarget, Schedule, TrainConfig,
    ValidationConfig, load_recipe, resolve)

RECORD_NAME = "genkit_lora.json"
UNSAVED = {("data", "buckets"): False}  # what a checkpoint older than a key did (no key: the key's value now)


@dataclass
class LoraTrainResult:
    out: Path  # OUT_DIR
    weights: Path  # OUT_DIR/pytorch_lora_weights.safetensors
    record: Path  # OUT_DIR/genkit_lora.json
    steps: int  # optimizer steps of the whole run
    loss: float | None  # the last step's loss in this call (None when a resume found nothing left to do)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to zero at the last step."""
    return shared.learning_rate(step, peak=cfg.learning_rate, warmup=cfg.warmup_steps, steps=cfg.steps,
                                  decay=Schedule(cfg.lr_scheduler).value)


# --- Pre-flight -----------------------------------------------------------------------------


def _check_resume(meta: dict, recipe: LoraRecipe, model: str, dataset: str) -> None:
    """A checkpoint continues only the run that made it: same base, data and data order, same adapters."""
    saved = meta["recipe"]
    now = json.loads(json.dumps(to_dict(recipe)))  # tuples as the JSON lists they were saved as
    shared.check_same_run(meta, model, dataset)
    keys = [("lora", k) for k in now["lora"]] + [("data", k) for k in now["data"]] + [("prior", k) for k in now["prior"]] + [
        ("train", k) for k in ("seed", "batch_size", "gradient_accumulation_steps")]
    for section, key in keys:
        before = saved[section].get(key, UNSAVED.get((section, key), now[section][key]))
        if before != now[section][key]:
            raise GenkitError(f"finds {section}.{key} = {before!r} in the checkpoint and {now[section][key]!r} "
                              "now (it must stay the same to continue that run)", param="resume")


def _model_id(model: str | None) -> str:
    """A preset name or hub id as given; a local folder as its absolute path (so a resume from elsewhere matches)."""
    from genkit import presets

    model = model or presets.DEFAULT_MODEL
    path = Path(model).expanduser()
    return str(path.resolve()) if presets.get(model) is None and path.exists() else model


def _supported(pipeline, recipe: LoraRecipe) -> None:
    if recipe.lora.text_encoder and not pipeline.family.text_encoder_lora:
        from genkit import families

        which = ", ".join(f.title for f in families.all_families() if f.text_encoder_lora)
        raise GenkitError(f"lora.text_encoder: text-encoder adapters are trained for {which} only, and "
                          f"{pipeline.name} is {pipeline.family.title}; set lora.text_encoder=false")
    problem = objectives.unfit(pipeline.family.target(pipeline.pipe), objectives.Timesteps.of(recipe.train))
    if problem:
        raise GenkitError(f"{problem} ({pipeline.name} is {pipeline.family.title})")


def _resolution(pipeline, data: DataConfig) -> DataConfig:
    """`data` with its sizes checked against the model's multiple, and resolution 0 made the model's own (or, with
    several sizes, the largest)."""
    from genkit.checks import check_multiple

    factor, where = pipeline.size_factor, f" for {pipeline.name}"
    for size in data.resolutions:
        check_multiple("data.resolutions", size, factor, where)
    if data.resolution == 0:
        return replace(data, resolution=max(data.resolutions, default=0) or pipeline.family.default_size(pipeline.pipe))
    return replace(data, resolution=check_multiple("data.resolution", data.resolution, factor, where))


def _precision(value: str, device: torch.device) -> str:
    """accelerate's mixed_precision name for a recipe's precision on this device."""
    precision = Precision(value)
    if precision is Precision.AUTO:
        if device.type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision is Precision.FP16 and device.type != "cuda":
        raise GenkitError(f"train.mixed_precision=fp16 needs a CUDA GPU, and this run is on {device.type} "
                          "(use fp32 or bf16)")
    return {Precision.FP32: "no", Precision.FP16: "fp16", Precision.BF16: "bf16"}[precision]


def _prior_items(out: Path, recipe: LoraRecipe, pipeline, items, triggers, progress: bool) -> list:
    """The prior images as training items (made into OUT/priors, or found there from an earlier start)."""
    from genkit.data.imagefolder import CaptionSource, Item

    prior = recipe.prior
    if not prior.active:
        return []
    source = PriorSource(prior.source)
    if source.value not in pipeline.family.prior_sources:
        what = {PriorSource.RENDER: "draws genkit-mini's shapes world"}.get(source, "does not apply here")
        raise GenkitError(f"prior.source={source.value} {what}, and {pipeline.name} is {pipeline.family.title}; set "
                          f"prior.source={' or '.join(pipeline.family.prior_sources)}")
    captions = priors.class_captions([item.caption for item in items], triggers)
    if source is PriorSource.MODEL and progress:
        example = f" (e.g. {captions[0]!r})" if captions else ""
        found = ", ".join(triggers) if triggers else f"none found: pass {term('data.trigger_words')} WORD"
        print(f"train lora: making {prior.images} prior images with the base model from {len(captions)} class "
              f"captions{example}; trigger words removed: {found}", file=sys.stderr)
    plan = priors.PriorPlan(source.value, prior.images, seed=recipe.train.seed, resolution=recipe.data.resolution,
                            captions=captions if source is PriorSource.MODEL else ())
    made = priors.make_priors(out / "priors", plan, pipeline=pipeline, batch_size=prior.batch_size,
                              progress=progress and source is PriorSource.MODEL)
    return [Item(path.resolve(), caption, CaptionSource.PRIOR) for path, caption in made]


# --- Writing --------------------------------------------------------------------------------


def _save_checkpoint(out: Path, step: int, params: dict, optimizer, scaler, meta: dict, keep: int, ema=None) -> None:
    opt_tensors, opt_meta = checkpoint.optimizer_tensors(optimizer)
    scaler_state = scaler.state_dict() if scaler is not None else None
    tensors = {"lora": {k: p.detach() for k, p in params.items()}, "optimizer": opt_tensors}
    if ema is not None:  # the averaged weights beside the trained ones, and how many updates made them
        tensors["ema"], meta = ema.tensors(), {**meta, "ema_updates": ema.updates}
    checkpoint.save(out, step, tensors, {**meta, "optimizer": opt_meta, "scaler": scaler_state}, keep=keep)


def _resume_ema(ema, ckpt: Path) -> None:
    tensors, meta = checkpoint.load(ckpt)
    if "ema" not in tensors:
        raise GenkitError(f"finds {ckpt.name} made without train.ema, so it holds no averaged weights to continue "
                          "(resume with train.ema=false, or start a new run)", param="resume")
    ema.load(tensors["ema"], meta["ema_updates"])


def _tracker_problem(name: str) -> str | None:
    """Why accelerate cannot log to tracker `name` here (its package missing), or None."""
    import importlib.util

    packages = {"tensorboard": ("tensorboard", "tensorboardX")}.get(name, (name,))
    if name == "none" or any(importlib.util.find_spec(p) for p in packages):
        return None
    return (f"train.log_with={name} needs the {packages[0]} package (pip install {packages[0]}), or set "
            "train.log_with=none")


def _load_checkpoint(ckpt: Path, params: dict, optimizer) -> dict:
    tensors, meta = checkpoint.load(ckpt)
    saved = tensors["lora"]
    if set(saved) != set(params):
        raise GenkitError(f"{ckpt} holds other adapter layers than this recipe makes", param="resume")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    checkpoint.load_optimizer(optimizer, tensors["optimizer"], meta["optimizer"])
    return meta


def _export(out: Path, pipeline, trained, record: dict) -> tuple[Path, Path]:
    """Write the weights (the family's diffusers layout and header) and the record, each by an atomic rename."""
    from genkit.outputs import atomic_write, save_text

    layers = adapters.layers(trained, pipeline.family)
    metadata = {name: module.peft_config["default"].to_dict() for name, module in trained}
    for meta in metadata.values():  # JSON-safe (peft keeps sets)
        meta.update({k: sorted(v) for k, v in meta.items() if isinstance(v, set)})
    atomic_write(out / WEIGHTS_NAME, lambda tmp: pipeline.family.save_lora(pipeline.pipe, tmp.parent, layers, metadata,
                                                                           tmp.name))
    save_text(out / RECORD_NAME, json.dumps(record, indent=1))
    return out / WEIGHTS_NAME, out / RECORD_NAME


def _validation_prompts(cfg: ValidationConfig, recipe: LoraRecipe, items) -> list[str]:
    if cfg.prompts:
        return list(cfg.prompts)
    if recipe.data.instance_prompt:
        return [recipe.data.instance_prompt]
    return sorted({item.caption for item in items})[:4]


def _validate(pipeline, trained, prompts: list[str], cfg: ValidationConfig, path: Path) -> None:
    """A grid of the adapted model's images at fixed seeds (image i: seed + i)."""
    from genkit.grid import make_grid
    from genkit.outputs import save_png

    for _, module in trained:
        module.eval()
    result = pipeline.generate(prompts, seed=cfg.seed, num_inference_steps=cfg.num_inference_steps,
                               batch_size=len(prompts))
    for _, module in trained:
        module.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(result.images, prompts, cols=min(4, len(prompts))), path)


def _trigger_words(items) -> list[str]:
    from genkit.data.imagefolder import CaptionSource

    return sorted({item.caption for item in items if item.source is CaptionSource.FOLDER})


# --- The memory plan -----------------------------------------------------------------------


def _lora_run(recipe: LoraRecipe, resolution: int, items, prior_images: int, prompts: int):
    """What the memory plan needs of a run: sizes, adapters, and how much the caches hold."""
    from genkit.memory.training import LoraRun

    data, lora = recipe.data, recipe.lora
    captions = len({item.caption for item in items}) + prior_images
    return LoraRun(resolution=resolution, batch_size=recipe.train.batch_size, rank=lora.rank,
                   target_modules=tuple(lora.target_modules), text_encoder=lora.text_encoder,
                   text_encoder_target_modules=tuple(lora.text_encoder_target_modules),
                   checkpointing=recipe.train.gradient_checkpointing, cache_latents=data.cache_latents,
                   validation_prompts=prompts if recipe.validation.every else 0,
                   images=(len(items) + prior_images) * (2 if data.flip else 1), captions=captions,
                   captions_every_step=data.caption_every_step)


def _prior_count(recipe: LoraRecipe) -> int:
    return recipe.prior.images if recipe.prior.active else 0


def _planned(model, recipe: LoraRecipe, items, device: str, dtype: str, memory):
    """The training plan of `model` (a MetaModel, a loaded Pipeline) for this recipe and data."""
    from genkit.memory.training import plan_training, training_model

    tm = training_model(model)
    prompts = len(_validation_prompts(recipe.validation, recipe, items)) if items else 4
    run = _lora_run(recipe, recipe.data.resolution or tm.default_resolution, items, _prior_count(recipe), prompts)
    return plan_training(tm, run, device=device, memory=memory, dtype=dtype)


def _meta(model_name: str):
    """The model's configs on the meta device, or None where there are none to read (genkit's own format)."""
    from genkit import memory

    try:
        return memory.meta_model(model_name)
    except GenkitError:
        return None


def _quantize(plan) -> str | None:
    """genkit.load's `quantize` for a plan's steps."""
    parts = ([f"denoiser={plan.quantization}"] if plan.quantization else []) + \
        (["text_encoders=int8"] if "text-encoders-int8" in plan.steps else [])
    return ",".join(parts) or None


def _check_plan(saved: dict, plan) -> None:
    """A resumed run keeps what changes its numbers: the optimizer and the base's quantization."""
    before = saved.get("memory_plan")
    if not before or not before.get("applied") or plan is None:
        return
    for key in ("optimizer", "quantization"):
        if before.get(key) != getattr(plan, key):
            raise GenkitError(f"finds the checkpoint trained with {key} {before.get(key)}, and this run's memory plan "
                              f"chose {getattr(plan, key)} (resume with the {term('memory')} it was started with)",
                              param="resume")


def _plan_run(model, config, overrides, instance_prompt, items, device, dtype: str, memory, applied: bool,
              progress: bool):
    """The run's memory plan, said in one stderr line; refused in one line when it is applied and nothing fits."""
    from accelerate import PartialState

    from genkit.memory.training import summary

    recipe = resolve(config, overrides, instance_prompt, family=model.family.name)
    where = "cuda" if device.type == "cuda" else "cpu"
    try:
        plan = _planned(model, recipe, items, where, dtype, memory)
    except GenkitError:
        if applied:
            raise
        return None  # a CPU whose free memory is not known: nothing to say
    if applied and not plan.fits:
        raise GenkitError(plan.refusal(), param="memory")
    if progress and PartialState().is_main_process:
        note = "" if applied else f" (printed, not applied: on a CPU {term('memory')} plans its RAM)"
        print(f"train lora: {summary(plan)}{note}", file=sys.stderr)
    return plan


def _caching(pipeline, recipe: LoraRecipe, steps, device, cuda: bool):
    """Where the encoders are while the caches fill (genkit.memory.training_runtime.Caching)."""
    from genkit.memory import training_runtime

    pipe = pipeline.pipe
    caching = training_runtime.Caching(pipe, pipeline.family.text_encoders(pipe), device,
                                       staying=_staying(pipeline, recipe), offloaded="encoders-offloaded" in steps,
                                       keep_vae=not recipe.data.cache_latents, active=cuda)
    if cuda:  # validation grids: one image a call, the VAE decoding one at a time; no re-placement on CUDA
        from genkit import memory

        pipeline.memory_step, pipeline.memory_model = memory.Step("device", "sliced", 1), None
        if hasattr(getattr(pipe, "vae", None), "enable_slicing"):
            pipe.vae.enable_slicing()
    return caching


def _staying(pipeline, recipe: LoraRecipe) -> list:
    """The text encoders that stay on the device while training: the trained one, or every one when captions are
    encoded every step."""
    pipe = pipeline.pipe
    if recipe.data.caption_every_step:
        return pipeline.family.text_encoders(pipe)
    return [pipe.text_encoder] if recipe.lora.text_encoder else []


def _prepare(accelerator, pipeline, trained, plan) -> list:
    """The trained models prepared by accelerate; with a plan (CUDA) placed first: the denoiser on the device but
    its swapped blocks' frozen weights (block swapping), a trained text encoder on the device."""
    modules = [module for _, module in trained]
    if plan is None:
        models = accelerator.prepare(*modules)
        return list(models) if isinstance(models, (list, tuple)) else [models]
    from genkit.memory import training_runtime

    if plan.blocks_swapped:
        training_runtime.swap_blocks(pipeline.denoiser, plan.blocks_swapped, accelerator.device)
    training_runtime.place_denoiser(pipeline.denoiser, accelerator.device)
    for module in modules[1:]:
        module.to(accelerator.device)
    return [accelerator.prepare_model(module, device_placement=False) for module in modules]


def _sampling(pipeline, recipe: LoraRecipe, steps, device, cuda: bool):
    """Where the models are while a validation grid is made: with the encoders offloaded on CUDA, in turns
    (genkit.memory.training_runtime.sampling); else where they are."""
    import contextlib

    if not cuda or "encoders-offloaded" not in steps:
        return contextlib.nullcontext()
    from genkit.memory import training_runtime

    pipe, staying = pipeline.pipe, _staying(pipeline, recipe)
    encoders = [e for e in pipeline.family.text_encoders(pipe) if not any(e is s for s in staying)]
    return training_runtime.sampling(pipe, pipeline.denoiser, encoders, device,
                                     vae_stays=not recipe.data.cache_latents)


def plan_memory(data_dir: str | Path | None, *, model: str | None = None, config=None, overrides=(),
                instance_prompt: str | None = None, memory=None):
    """The memory plan `genkit train lora DATA --dry-run` prints, made without training and without reading any
    weights (genkit-mini's, which has no configs to plan from, are loaded on the CPU).

    The device planned for: a CPU with train.device=cpu; else CUDA where this machine has it or `memory` is given
    (a card that is not here); else this CPU. DATA, where it is a folder of images, gives the caches' sizes and the
    validation prompts; it may be missing or empty."""
    from genkit.data.imagefolder import scan_folder

    recipe = resolve(config, overrides, instance_prompt)
    cfg = recipe.train
    cuda = cfg.device != "cpu" and (torch.cuda.is_available() or memory is not None)
    precision = Precision(cfg.mixed_precision)
    if not cuda and precision is Precision.FP16:
        raise GenkitError("train.mixed_precision=fp16 needs a CUDA GPU (use fp32 or bf16)")
    dtype = precision.value if precision is not Precision.AUTO else "fp32" if not cuda else \
        "fp16" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bf16"
    items = []
    if data_dir is not None and Path(data_dir).is_dir():
        try:
            items = scan_folder(data_dir, instance_prompt=recipe.data.instance_prompt or None).items
        except GenkitError:  # no images yet: the plan sizes the caches for none
            items = []
    model_name = _model_id(model)
    source = _meta(model_name)
    if source is None:
        import genkit

        source = genkit.load(model_name, device="cpu", dtype=dtype)
    family = source.family.name
    recipe = resolve(config, overrides, instance_prompt, family=family)
    return _planned(source, recipe, items, "cuda" if cuda else "cpu", dtype, memory)


# --- The training run -----------------------------------------------------------------------


@dataclass
class _Loop:
    """What an optimizer step needs: the prepared models, the caches, the noise schedule, the optimizer."""

    accelerator: object
    models: list  # as accelerate prepared them; the decoder first
    encoders: Encoders
    data: RunData  # the items (the concept's images, then the prior images), their buckets, which each sample is
    scheduler: object  # the noise schedule to train on (DDPM from the base model's config; None for flow matching)
    params: dict[str, torch.nn.Parameter]
    optimizer: object
    recipe: LoraRecipe
    ema: adapters.Ema | None = None  # updated after every optimizer step (train.ema)

    @property
    def items(self) -> list:
        return self.data.items

    @property
    def instances(self) -> int:
        """items[:instances] are the concept's images, the rest prior images."""
        return self.data.instances

    def step(self, step: int) -> float:
        """One optimizer step over `gradient_accumulation_steps` forward passes; returns their mean loss."""
        cfg = self.recipe.train
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, step, 1]).generate_state(1)[0]))  # adapter dropout
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        loss = float(np.mean([self._pass(step, micro) for micro in range(cfg.gradient_accumulation_steps)]))
        if self.ema is not None:
            self.ema.step(self.params)
        return loss

    def _pass(self, step: int, micro: int) -> float:
        cfg, accelerator, denoiser = self.recipe.train, self.accelerator, self.models[0]
        family, pipe = self.encoders.family, self.encoders.pipe
        rank = accelerator.process_index
        bucket, picked = self.data.rows(step, micro, cfg, self.recipe.data.flip, accelerator.num_processes, rank)
        # one generator per sample, keyed by its place in the whole run: one process with batch 2 and two
        # processes with batch 1 draw the same latents, noise and timesteps for the same samples
        first = sample_index(step, micro, cfg, accelerator.num_processes, rank)
        gens = [shared.step_generator(cfg.seed, first + j) for j in range(len(picked))]
        with accelerator.accumulate(*self.models):
            clean, masks = self.encoders.clean(self.items, picked, bucket, gens)
            noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in gens]).to(clean.device)
            timesteps = objectives.Timesteps.of(cfg)
            noisy, t, target = objectives.noisy(family.target(pipe), self.scheduler, clean, noise, gens, timesteps)
            blank = self._unconditional_rows(picked, gens)
            cond = self.encoders.text(["" if j in blank else self._caption(i, first + j)
                                       for j, (i, _, _) in enumerate(picked)])
            dtype = family.denoiser(pipe).dtype
            cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
            prior_rows = sorted(blank | {j for j, (i, _, _) in enumerate(picked) if i >= self.instances})
            if prior_rows and PriorTarget(self.recipe.prior.target) is PriorTarget.BASE:
                target = self._base_target(target, prior_rows, noisy.to(dtype), t, cond)
            with accelerator.autocast():
                output = family.forward(pipe, denoiser, noisy.to(dtype), t, cond)
            loss = F.mse_loss(output.float(), target.float(), reduction="none")
            if masks is not None:  # kohya's masked loss: black latent pixels count for nothing, white in full
                loss = loss * masks
            loss = loss.flatten(1).mean(1)
            weights = torch.ones_like(loss)
            weights[prior_rows] = self.recipe.prior.weight
            if (by_time := objectives.loss_weights(family.target(pipe), self.scheduler, t, timesteps)) is not None:
                weights = weights * by_time.to(weights.device)  # min-SNR, or SD3's sigma_sqrt / cosmap weighting
            loss = (loss * weights).mean()
            if not torch.isfinite(loss):
                raise GenkitError(f"loss became {loss.item()} at step {step + 1}; no weights were written and the last "
                                  f"checkpoint is untouched (lower train.learning_rate and {term('resume')})")
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _caption(self, item: int, sample: int) -> str:
        """What sample `sample` trains on for `item`: a concept image's caption dropped or its tags shuffled as
        data.caption_dropout and data.shuffle_caption say (seeded by the sample alone); a prior image's as it is."""
        caption, data = self.items[item].caption, self.recipe.data
        if item >= self.instances:
            return caption
        from genkit.data.captions import caption_variant

        return caption_variant(caption, sample, self.recipe.train.seed, dropout=data.caption_dropout,
                               shuffle=data.shuffle_caption, keep_tokens=data.keep_tokens)

    def _unconditional_rows(self, picked, gens) -> set[int]:
        """The concept rows of this pass shown with an empty caption (prior.unconditional of them, drawn from each
        sample's own generator after its noise, so the choice is the same for any batch size or process count);
        they count as prior rows: toward the base model's unconditional prediction with prior.target = base."""
        share = self.recipe.prior.unconditional
        if not share:
            return set()
        return {j for j, ((i, _, _), g) in enumerate(zip(picked, gens))
                if i < self.instances and torch.rand((), generator=g).item() < share}

    @torch.no_grad()
    def _base_target(self, target, rows: list[int], noisy, t, cond) -> torch.Tensor:
        """`target` with the prior rows replaced by the base model's own prediction on them (every adapter off):
        the prior images then pull the adapted model toward what the base draws for them exactly, not toward
        one noisy sample of it. Every conditioning tensor is per sample (batch first), so the rows are sliced.
        With lora.text_encoder the captions were encoded by the adapted encoder (this step's, with gradients);
        the target then holds the base denoiser on them, not the base text encoder too."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        family, pipe = self.encoders.family, self.encoders.pipe
        index = torch.tensor(rows, device=target.device)
        layers = [m for model in self.models for m in self.accelerator.unwrap_model(model).modules()
                  if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            with self.accelerator.autocast():
                base = family.forward(pipe, self.accelerator.unwrap_model(self.models[0]), noisy[index], t[index],
                                      {k: v[index] for k, v in cond.items()})
        finally:
            for layer in layers:
                layer.enable_adapters(True)
        return target.float().index_copy(0, index, base.float())


def _placement(cfg: TrainConfig) -> tuple[torch.device, str, bool]:
    """(device, accelerate's mixed-precision name, CPU only) for a recipe, before any model is loaded."""
    from accelerate import PartialState

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()  # accelerate uses gloo for CPU processes only if told
    device = PartialState(cpu=cpu).device
    return device, _precision(cfg.mixed_precision, device), cpu


def _accelerator(cfg: TrainConfig, out: Path | None = None):
    """accelerate's Accelerator for the run's final recipe (its gradient accumulation is the family's), with the
    loss-curve tracker train.log_with names writing into OUT/logs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    _, mixed, cpu = _placement(cfg)
    AcceleratorState._reset_state()  # this run's precision, not an earlier run's in this process (a notebook's)
    tracked = cfg.log_with != "none" and out is not None
    return Accelerator(mixed_precision=mixed, gradient_accumulation_steps=cfg.gradient_accumulation_steps, cpu=cpu,
                       log_with=cfg.log_with if tracked else None, project_dir=str(out / "logs") if tracked else None)


def _tracker_config(recipe: LoraRecipe) -> dict:
    """The recipe as one flat table of scalars (TensorBoard's hparams take no lists)."""
    return {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
            for section, values in json.loads(json.dumps(to_dict(recipe))).items() for key, value in values.items()}


def train_lora(
    data_dir: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    config: LoraRecipe | str | Path | None = None,
    overrides=(),
    resume: bool = False,
    instance_prompt: str | None = None,
    progress: bool = True,
    memory=None,
) -> LoraTrainResult:
    """Train a LoRA on the images in `data_dir` into `out` (or continue the run there with `resume`).

    `config` is a `LoraRecipe`, a TOML recipe path, or None for the defaults; `overrides` are
    `section.key=value` strings; `instance_prompt` captions the images that have no caption. `memory` (bytes or
    "24GiB"): plan for that much GPU memory (default: what is free), or on a CPU plan its RAM (default: not planned).
    """
    from diffusers.training_utils import cast_training_params

    import genkit
    from genkit.data.imagefolder import fingerprint, scan_folder, warn_small_images
    from genkit.generate import versions
    from genkit.memory.training import record as training_record
    from genkit.progress import progress_bar

    # 1. Pre-flight, before the slow model load: recipe, images and captions, the output folder
    recipe = resolve(config, overrides, instance_prompt)  # every user value checked; the family's table comes later
    cfg, out = recipe.train, Path(out)
    scan = scan_folder(data_dir, instance_prompt=recipe.data.instance_prompt or None)
    items, dataset = scan.items, fingerprint(scan.items)
    ckpt = shared.resume_point(out, resume, finished=out / WEIGHTS_NAME)
    if recipe.lora.text_encoder and (problem := text_encoder_problem()):
        raise GenkitError(f"lora.text_encoder: {problem} (upgrade peft, or set lora.text_encoder=false)")
    model_name = _model_id(model)
    if problem := _tracker_problem(cfg.log_with):
        raise GenkitError(problem)

    # 2. Device and precision from accelerate; the memory plan (from the model's configs, before the load); the base
    #    model, frozen, in the compute dtype, quantized if the plan says so
    device, mixed, _ = _placement(cfg)
    dtype, cuda = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[mixed], device.type == "cuda"
    applied = cuda or memory is not None  # on a CPU the plan's steps are taken only for a given budget
    configs = _meta(model_name)
    plan = None
    if configs is not None:
        plan = _plan_run(configs, config, overrides, instance_prompt, items, device, dtype, memory, applied, progress)
    pipeline = genkit.load(model_name, device=str(device), dtype=dtype, quantize=_quantize(plan) if applied and plan
                           else None, cpu_offload=cuda, memory=memory if cuda else None)
    if configs is None:  # genkit's own format: planned from the loaded modules
        plan = _plan_run(pipeline, config, overrides, instance_prompt, items, device, dtype, memory, applied, progress)
    steps = plan.steps if applied and plan is not None else []
    recipe = resolve(config, overrides, instance_prompt, family=pipeline.family.name)
    cfg = recipe.train
    accelerator = _accelerator(cfg, out)  # after the family's table: it sets gradient accumulation
    if problem := _tracker_problem(cfg.log_with):  # a family's table may name one
        raise GenkitError(problem)
    _supported(pipeline, recipe)
    pipe = pipeline.pipe
    recipe = replace(recipe, data=_resolution(pipeline, recipe.data))
    if accelerator.is_main_process:
        warn_small_images(items, max(recipe.data.sizes))
    if ckpt is not None:
        _check_resume(checkpoint.load(ckpt)[1], recipe, model_name, dataset)
        _check_plan(checkpoint.load(ckpt)[1], plan if applied else None)
    for part in (pipeline.denoiser, *pipeline.family.text_encoders(pipe), getattr(pipe, "vae", None)):
        if part is not None:
            part.requires_grad_(False)

    # 3. Prior images (made once, by the main process, before any adapter exists), then the adapters (seeded; trained in fp32 whatever the base's dtype), optimizer, and the state to resume
    triggers = tuple(recipe.data.trigger_words) or priors.find_trigger_words(
        [item.caption for item in items], getattr(pipe, "tokenizer", None))
    with accelerator.main_process_first():
        prior_items = _prior_items(out, recipe, pipeline, items, triggers, progress and accelerator.is_main_process)
    data = plan_data(items, prior_items, recipe.data, pipeline.size_factor,
                     Fraction(recipe.prior.fraction).limit_denominator(1000))
    torch.manual_seed(cfg.seed)
    trained = adapters.add(pipe, pipeline.family, recipe.lora)
    cast_training_params([module for _, module in trained], dtype=torch.float32)
    params = adapters.params(trained)
    if cfg.gradient_checkpointing or "checkpointing" in steps:
        pipeline.denoiser.enable_gradient_checkpointing()
        if recipe.lora.text_encoder:
            pipe.text_encoder.gradient_checkpointing_enable()
    from genkit.memory import training_runtime

    optimizer = training_runtime.optimizer(params.values(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                           eight_bit="adamw-8bit" in steps)
    meta = _load_checkpoint(ckpt, params, optimizer) if ckpt is not None else {"step": 0}

    # 4. Encode each caption and each image variant once (the encoders are frozen; on CUDA on the GPU as the plan
    #    says), then the trained models on the device (swapped blocks on the CPU) and prepared by accelerate
    encoders = Encoders(pipeline, recipe, recipe.data.resolution, accelerator.device, text_encoder=trained[-1][1],
                        masks=data.masks)
    run_items = data.items
    caching = _caching(pipeline, recipe, steps, accelerator.device, cuda)
    if not recipe.lora.text_encoder and not recipe.data.caption_every_step:
        with caching.texts():
            encoders.text_cache.fill([item.caption for item in run_items])
    if recipe.data.cache_latents:
        with caching.images():
            encoders.fill_image_cache(data.variants(recipe.data.flip))
    models = _prepare(accelerator, pipeline, trained, plan if cuda else None)
    encoders.text_encoder = models[-1] if recipe.lora.text_encoder else encoders.text_encoder
    optimizer = accelerator.prepare(optimizer)
    if meta.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(meta["scaler"])
    for module in models:
        module.train()
    scheduler = objectives.training_scheduler(pipeline.family.target(pipe), pipe)
    ema = adapters.Ema(params, cfg.ema_decay) if cfg.ema else None  # on the device, where the weights now are
    if ema is not None and ckpt is not None:
        _resume_ema(ema, ckpt)
    loop = _Loop(accelerator, models, encoders, data, scheduler, params, optimizer, recipe, ema=ema)

    # 5. The loop, then checkpoints (atomic, then rotated) and validation grids on schedule
    start, main, every = meta["step"], accelerator.is_main_process, recipe.validation.every
    run_meta = {"model": model_name, "dataset": dataset, "recipe": to_dict(recipe),
                "memory_plan": {**training_record(plan), "applied": applied} if plan is not None else None}
    prompts = _validation_prompts(recipe.validation, recipe, items)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    effective = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    if main and progress:
        if prior_items:
            print(f"train lora: {len(prior_items)} prior images ({recipe.prior.source}) in {out / 'priors'}, "
                  f"{recipe.prior.fraction:.0%} of every batch", file=sys.stderr)
        if len(data.plan.buckets) > 1 or data.masks:
            print(f"train lora: buckets {data.describe()}; {len(data.masks)} images with a loss mask", file=sys.stderr)
        print(f"train lora: {len(items)} items, effective batch {effective} = {cfg.batch_size} per pass x "
              f"{cfg.gradient_accumulation_steps} accumulated x {accelerator.num_processes} processes",
              file=sys.stderr)
    loss = None
    if cfg.log_with != "none":
        accelerator.init_trackers("genkit-lora", config=_tracker_config(recipe))
    with shared.LossLog(out / "loss.jsonl", start, enabled=main) as log, progress_bar(
            range(start, cfg.steps), initial=start, total=cfg.steps, unit="step", desc="train lora",
            progress=progress and main) as bar:
        for step in bar:
            loss = loop.step(step)
            done = step + 1
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate(step, cfg):.1e}")
            log.write(done, loss)
            accelerator.log({"loss": loss, "learning_rate": learning_rate(step, cfg)}, step=done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                adapters.check_finite(params, done)
                accelerator.wait_for_everyone()
                if main:
                    _save_checkpoint(out, done, params, optimizer, accelerator.scaler, run_meta, cfg.keep_checkpoints,
                                     ema)
            if main and every and (done % every == 0 or done == cfg.steps):
                with _sampling(pipeline, recipe, steps, accelerator.device, cuda), \
                        (ema.applied(params) if ema is not None else contextlib.nullcontext()):
                    _validate(pipeline, trained, prompts, recipe.validation,
                              out / "samples" / f"step-{done:07d}.png")

    # 6. Export the adapter (its moving average with train.ema) and the record of how it was made
    adapters.check_finite(params, cfg.steps)
    if ema is not None:
        ema.copy_to(params)
    weights, record = out / WEIGHTS_NAME, out / RECORD_NAME
    if main:
        weights, record = _export(out, pipeline, trained, {
            "base_model": model_name, "kind": pipeline.family.file_format, "family": pipeline.family.name, "steps": cfg.steps, "dataset": dataset,
            "data_dir": str(scan.data_dir), "images": scan.images, "items": len(items),
            "buckets": {str(bucket): data.plan.counts()[b] for b, bucket in enumerate(data.plan.buckets)},
            "masks": len(data.masks),
            "instance_prompt": recipe.data.instance_prompt or None, "trigger_words": list(triggers or _trigger_words(items)),
            "prior": {"source": recipe.prior.source, "images": len(prior_items), "fraction": recipe.prior.fraction,
                      "folder": "priors" if prior_items else None},
            "effective_batch_size": effective, "processes": accelerator.num_processes,
            "memory_plan": {**training_record(plan), "applied": applied} if plan is not None else None,
            "recipe": to_dict(recipe), "versions": versions(),
        })
    accelerator.wait_for_everyone()
    accelerator.end_training()  # the trackers' last write; it also ends the process group, so after the last barrier
    return LoraTrainResult(out=out, weights=weights, record=record, steps=cfg.steps, loss=loss)
