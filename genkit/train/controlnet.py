"""Train a ControlNet on a folder of your images (`genkit train controlnet`, `genkit.train_controlnet`).

diffusers' ControlNet training recipe (examples/controlnet/train_controlnet.py), on genkit's training pieces:

- the ControlNet starts as `ControlNetModel.from_unet(unet)` (the family's `new_controlnet`: the UNet's encoder and
  middle copied, zero convolutions out, so at step 0 it changes nothing); the base model stays frozen and only the
  ControlNet learns (AdamW; gradient clipping; the learning rate warmed up, then constant or cosine);
- the control image of each training image is its canny edge map (`data.preprocessor = "canny"`, the same
  `genkit.controlnet.canny` that `--control ...,preprocessor=canny` runs at generation), or a ready map beside it,
  `photo.control.png` for `photo.jpg` (`"none"`); `data.caption_dropout` empties that share of captions
  (diffusers' `--proportion_empty_prompts`), so the control alone can steer;
- the loss is the family's own denoising objective (genkit.train.objectives: noise, v or flow targets), with the
  ControlNet's residuals added to the frozen UNet's skip connections as its pipeline adds them.

From the LoRA trainer: the folder scan and captions (genkit.data.imagefolder: sidecar captions, metadata.jsonl,
kohya folders, --instance-prompt), the image and caption caches (genkit.train.encoders: VAE latents for SD-family
models, pixels for genkit-mini), the per-sample generators (a run is a function of its seed and step, so a resumed
run ends bitwise equal to an unbroken one), atomic rotated checkpoints and `--resume`, the loss log, accelerate's
device and precision, and its several processes (`accelerate launch`: each takes its share of every batch; the
gradients are averaged before each step). Images are trained square at `data.resolution` (centre-cropped; no
buckets yet).

Output, in OUT: a diffusers ControlNet folder (`config.json`, `diffusion_pytorch_model.safetensors`), which
`--control model=OUT,image=...` and plain diffusers' `ControlNetModel.from_pretrained(OUT)` load, and
`genkit_controlnet.json`, the record of how it was made.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genkit.checks import DEFAULT_MAX_SIDE
from genkit.config import number, to_dict
from genkit.errors import GenkitError, term
from genkit.train import checkpoint, objectives, shared
from genkit.train.recipe import TrainConfig, ValidationConfig, layered

RECORD_NAME = "genkit_controlnet.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' name, beside its config.json
SHIPPED = "controlnet"  # configs/controlnet.toml
PREPROCESSORS = ("canny", "none")


@dataclass
class ControlDataConfig:
    resolution: int = number(0, 0, DEFAULT_MAX_SIDE)  # training size in pixels, square; 0: the model's own
    preprocessor: str = "canny"  # canny: edge maps of the images; none: photo.control.png beside each photo
    caption_dropout: float = number(0.0, 0, 1, high_open=True)  # share of captions trained as "" (the control alone)
    flip: bool = False  # also train each image mirrored (its control map mirrored with it)
    instance_prompt: str = ""  # the caption of images that have none

    def __post_init__(self):
        if self.preprocessor not in PREPROCESSORS:
            raise ValueError(f"data.preprocessor must be canny or none (a ready map: NAME.control.png beside each "
                             f"image), got {self.preprocessor!r}")


@dataclass
class ControlNetRecipe:
    data: ControlDataConfig = field(default_factory=ControlDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass
class ControlNetTrainResult:
    out: Path
    weights: Path
    record: Path
    steps: int
    loss: float | None


def shipped_path() -> Path:
    from genkit.presets import packaged_dir

    return Path(str(packaged_dir("_configs", "configs").joinpath(f"{SHIPPED}.toml")))


def resolve(config: ControlNetRecipe | str | Path | None = None, overrides=(), instance_prompt: str | None = None,
            family: str | None = None) -> ControlNetRecipe:
    """The run's recipe, as the LoRA trainer's: configs/controlnet.toml (with `family`'s table), then `config`'s
    file, then `section.key=value` overrides."""
    recipe = layered(ControlNetRecipe, shipped_path(), config, overrides, family)
    if instance_prompt is not None:
        recipe = replace(recipe, data=replace(recipe.data, instance_prompt=instance_prompt))
    return recipe


# --- Data: each image with its control map ----------------------------------------------------------------------


def control_file(path: Path) -> Path:
    """Where an image's ready control map lies: photo.control.png beside photo.jpg."""
    from genkit.data.imagefolder import CONTROL_SUFFIX

    return path.with_name(path.stem + CONTROL_SUFFIX)


def _check_controls(items, preprocessor: str) -> None:
    if preprocessor != "none":
        return
    missing = sorted({str(item.path) for item in items if not control_file(item.path).is_file()})
    if missing:
        raise GenkitError(f"data.preprocessor=none needs a control map beside each image, and {len(missing)} have "
                          f"none (first: {missing[0]}: add {control_file(Path(missing[0])).name}, or use "
                          "data.preprocessor=canny)")


def _fingerprint(items, preprocessor: str) -> str:
    """The dataset's fingerprint (images and captions), with the ready control maps' bytes when they are used."""
    import hashlib

    from genkit.data.imagefolder import fingerprint
    from genkit.files import file_sha256

    base = fingerprint(items)
    if preprocessor != "none":
        return base
    maps = sorted(file_sha256(control_file(p)) for p in {item.path for item in items})
    return hashlib.sha256((base + "".join(maps)).encode()).hexdigest()[:16]


def _control_pixels(path: Path, preprocessor: str, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: the image's control map as the ControlNet reads it at generation."""
    from genkit.controlnet import canny, fit
    from genkit.data.decode import load_training_pair, open_rgb

    if preprocessor == "canny":
        picture = canny(load_training_pair(path, size)[0])  # of the training image exactly as trained
    else:
        picture = fit(open_rgb(control_file(path)), size, size)
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class Samples:
    """Every (image, mirrored) variant encoded once (latents or pixels) with its control map, and the captions."""

    def __init__(self, pipeline, items, recipe: ControlNetRecipe, device):
        from genkit.data.decode import load_training_pair, to_tensor

        self.family, self.pipe, self.device = pipeline.family, pipeline.pipe, device
        self.items, self.recipe = items, recipe
        size, paths = recipe.data.resolution, sorted({item.path for item in items})
        self.encoded, self.controls = {}, {}
        with torch.no_grad():
            for i in range(0, len(paths), 8):  # fixed chunks: the cache is bitwise the same on every run
                chunk = paths[i:i + 8]
                pixels = torch.stack([to_tensor(load_training_pair(p, size)[0]) for p in chunk])
                for mirrored in (False, True) if recipe.data.flip else (False,):
                    shown = torch.flip(pixels, dims=[-1]) if mirrored else pixels
                    encoded = self.family.encode_images(self.pipe, shown.to(device)).cpu()
                    self.encoded.update(((p, mirrored), e) for p, e in zip(chunk, encoded))
                for p in chunk:
                    control = _control_pixels(p, recipe.data.preprocessor, size)
                    self.controls[(p, False)] = control
                    self.controls[(p, True)] = torch.flip(control, dims=[-1])
        self.text = shared.CaptionCache(lambda captions: self.family.encode_captions(self.pipe, captions, device))
        self.text.fill(sorted({item.caption for item in items} | ({""} if recipe.data.caption_dropout else set())))

    def order(self, epoch: int) -> list[tuple[int, bool]]:
        """The epoch's (item, mirrored) rows: a permutation seeded by (seed, epoch); mirrored by a coin per row."""
        rng = np.random.default_rng([self.recipe.train.seed, epoch, 7])
        rows = rng.permutation(len(self.items)).tolist()
        flips = rng.random(len(rows)) < 0.5 if self.recipe.data.flip else [False] * len(rows)
        return [(i, bool(f)) for i, f in zip(rows, flips)]

    def rows(self, step: int, micro: int, processes: int = 1, rank: int = 0) -> list[tuple[int, bool, int]]:
        """(item, mirrored, sample index) of one process's forward pass: the run's samples in epoch order, each pass
        of all processes taking the next `processes` x batch_size of them (rank r the r-th batch_size)."""
        cfg = self.recipe.train
        first = ((step * cfg.gradient_accumulation_steps + micro) * processes + rank) * cfg.batch_size
        picked = []
        for sample in range(first, first + cfg.batch_size):
            epoch, place = divmod(sample, len(self.items))
            if not picked or picked[-1][2] // len(self.items) != epoch:
                order = self.order(epoch)
            picked.append((*order[place], sample))
        return picked

    def batch(self, picked, gens) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(clean latents or pixels, control maps, the denoiser's text inputs) of the rows `picked`."""
        cfg, data = self.recipe.train, self.recipe.data
        keys = [(self.items[i].path, m) for i, m, _ in picked]
        encoded = torch.stack([self.encoded[key] for key in keys]).to(self.device)
        clean = self.family.latents(self.pipe, encoded, gens)
        controls = torch.stack([self.controls[key] for key in keys]).to(self.device)
        captions = []
        for (i, _, sample) in picked:  # the dropout coin: the sample's own, whatever the batch size
            coin = np.random.default_rng([cfg.seed, sample, 11]).random()
            captions.append("" if coin < data.caption_dropout else self.items[i].caption)
        return clean, controls, self.text(captions)


class Steered(torch.nn.Module):
    """The frozen denoiser with a ControlNet's residuals added, called as the family calls its denoiser in training
    (`Family.forward`), so every UNet family's inputs (SDXL's added conditions, genkit-mini's text mask) pass through
    as they are; the ControlNet reads the same ones (it takes no text mask)."""

    def __init__(self, denoiser, controlnet):
        super().__init__()
        self.denoiser, self.controlnet = denoiser, controlnet
        self.control: torch.Tensor | None = None

    @property
    def dtype(self):
        return self.denoiser.dtype

    def forward(self, sample, t, **inputs):
        read = {k: v for k, v in inputs.items() if k != "encoder_attention_mask"}
        down, mid = self.controlnet(sample, t, controlnet_cond=self.control.to(sample.dtype), return_dict=False,
                                    **read)
        dtype = self.denoiser.dtype  # the residuals in the base's dtype, as diffusers' train_controlnet.py adds them
        return self.denoiser(sample, t, down_block_additional_residuals=[d.to(dtype) for d in down],
                             mid_block_additional_residual=mid.to(dtype), **inputs)


# --- The run --------------------------------------------------------------------------------------------------------


def _check_resume(meta: dict, recipe: ControlNetRecipe, model: str, dataset: str) -> None:
    """A checkpoint continues only the run that made it: same base, data, and what orders the data."""
    saved, now = meta["recipe"], json.loads(json.dumps(to_dict(recipe)))
    shared.check_same_run(meta, model, dataset)
    keys = [("data", k) for k in now["data"]] + [("train", k) for k in ("seed", "batch_size",
                                                                       "gradient_accumulation_steps")]
    for section, key in keys:
        if saved[section][key] != now[section][key]:
            raise GenkitError(f"finds {section}.{key} = {saved[section][key]!r} in the checkpoint and "
                              f"{now[section][key]!r} now (it must stay the same to continue that run)", param="resume")


def _supported(pipeline) -> None:
    family = pipeline.family
    if "ControlNetModel" not in family.controlnet_classes or not hasattr(family, "new_controlnet"):
        from genkit import families

        which = ", ".join(f.title for f in families.all_families() if "ControlNetModel" in f.controlnet_classes)
        raise GenkitError(f"genkit trains ControlNets for UNet models ({which}); {pipeline.name} is {family.title}, "
                          f"whose ControlNets it only runs (--control)", param="model")


def _validate(pipeline, controlnet, samples: Samples, recipe: ControlNetRecipe, path: Path) -> None:
    """A grid of control maps and what the model draws from each (the first distinct captions' images), through
    `generate(control=...)` as a user's run goes."""
    from PIL import Image

    from genkit import controlnet as control
    from genkit.grid import make_grid
    from genkit.outputs import save_png

    cfg, shown = recipe.validation, []
    for item in samples.items:
        if item.caption not in {c for c, _ in shown}:
            shown.append((item.caption, item.path))
        if len(shown) == 4:
            break
    prompts = list(cfg.prompts) or [caption for caption, _ in shown]
    path.parent.mkdir(parents=True, exist_ok=True)
    key, images, labels = str(path.parent), [], []  # an existing path (units are checked); never loaded from
    if next(controlnet.parameters()).dtype != pipeline.dtype:  # trained in fp32 beside a half-precision base
        import copy

        controlnet = copy.deepcopy(controlnet).to(pipeline.dtype)
    pipeline.controlnets[key] = control.Loaded(controlnet, "training", key, "training")
    try:
        for k, prompt in enumerate(prompts):
            pixels = samples.controls[(shown[k % len(shown)][1], False)]
            picture = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            unit = control.Control(model=key, image=picture, preprocessor="none")
            result = pipeline.generate(prompt, seed=cfg.seed + k, num_inference_steps=cfg.num_inference_steps,
                                       control=[unit], width=recipe.data.resolution, height=recipe.data.resolution)
            images += [picture, result.images[0]]
            labels += ["control", prompt]
    finally:
        del pipeline.controlnets[key]
    save_png(make_grid(images, labels, cols=4), path)


def train_controlnet(data_dir: str | Path, out: str | Path, *, model: str | None = None,
                     config: ControlNetRecipe | str | Path | None = None, overrides=(), resume: bool = False,
                     instance_prompt: str | None = None, progress: bool = True) -> ControlNetTrainResult:
    """Train a ControlNet for `model` on the images in `data_dir` into `out` (or continue the run there with
    `resume`). `config`: a `ControlNetRecipe`, a TOML recipe, or None for configs/controlnet.toml; `overrides`:
    `section.key=value` strings; `instance_prompt` captions the images that have none."""
    from diffusers.training_utils import cast_training_params

    import genkit
    from genkit.data.imagefolder import scan_folder, warn_small_images
    from genkit.generate import versions
    from genkit.outputs import atomic_folder, save_text
    from genkit.progress import progress_bar
    from genkit.train.lora import _accelerator, _model_id, _placement, learning_rate

    # 1. Pre-flight, before the model loads: the recipe, the images, captions and control maps, the output folder
    recipe = resolve(config, overrides, instance_prompt)
    out = Path(out)
    scan = scan_folder(data_dir, instance_prompt=recipe.data.instance_prompt or None)
    items = scan.items
    _check_controls(items, recipe.data.preprocessor)
    if recipe.data.preprocessor == "canny":
        from genkit.controlnet import require_opencv

        require_opencv()
    dataset = _fingerprint(items, recipe.data.preprocessor)
    ckpt = shared.resume_point(out, resume, finished=out / WEIGHTS_NAME)
    model_name = _model_id(model)

    # 2. The frozen base model, then the family's recipe table
    device, mixed, _ = _placement(recipe.train)
    dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[mixed]
    pipeline = genkit.load(model_name, device=str(device), dtype=dtype)
    _supported(pipeline)
    recipe = resolve(config, overrides, instance_prompt, family=pipeline.family.name)
    recipe = replace(recipe, data=replace(recipe.data, resolution=_resolution(pipeline, recipe.data.resolution)))
    cfg = recipe.train
    accelerator = _accelerator(cfg, out)
    processes, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    pipe, family = pipeline.pipe, pipeline.family
    warn_small_images(items, recipe.data.resolution)
    if ckpt is not None:
        _check_resume(checkpoint.load(ckpt)[1], recipe, model_name, dataset)
    for part in (pipeline.denoiser, *family.text_encoders(pipe), getattr(pipe, "vae", None)):
        if part is not None:
            part.requires_grad_(False)

    # 3. The ControlNet (seeded: from_unet copies the UNet, the zero convolutions and conditioning embedding are
    #    drawn), trained in fp32; the optimizer, and the state to resume
    torch.manual_seed(cfg.seed)
    controlnet = family.new_controlnet(pipe).to(accelerator.device).train()
    cast_training_params(controlnet, dtype=torch.float32)
    params = [p for p in controlnet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start = 0
    if ckpt is not None:
        tensors, meta = checkpoint.load(ckpt)
        controlnet.load_state_dict(tensors["controlnet"])
        checkpoint.load_optimizer(optimizer, tensors["optimizer"], meta["optimizer"])
        start = meta["step"]
    samples = Samples(pipeline, items, recipe, accelerator.device)
    # the model is not wrapped (accelerate's wrapper would hand fp32 residuals to a half-precision base): autocast
    # goes around its call, and with several processes the gradients are averaged here before each optimizer step
    optimizer = accelerator.prepare(optimizer)
    steered = Steered(pipeline.denoiser, controlnet)
    target = family.target(pipe)
    scheduler = objectives.training_scheduler(target, pipe)
    timesteps = objectives.Timesteps.of(cfg)
    run_meta = {"model": model_name, "dataset": dataset, "recipe": to_dict(recipe)}
    effective = cfg.batch_size * cfg.gradient_accumulation_steps * processes
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if progress and main:
        print(f"train controlnet: {len(items)} items ({scan.images} images), {recipe.data.preprocessor} control "
              f"maps, {recipe.data.resolution} px, effective batch {effective} = {cfg.batch_size} per pass x "
              f"{cfg.gradient_accumulation_steps} accumulated x {processes} processes", file=sys.stderr)

    # 4. The loop: each pass's rows, noise and timesteps from its samples' generators; checkpoints and grids
    def one_pass(step: int, micro: int) -> float:
        picked = samples.rows(step, micro, processes, rank)
        gens = [shared.step_generator(cfg.seed, sample) for _, _, sample in picked]
        with accelerator.accumulate(controlnet):
            clean, controls, cond = samples.batch(picked, gens)
            noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in gens]).to(clean.device)
            noisy, t, goal = objectives.noisy(target, scheduler, clean, noise, gens, timesteps)
            dtype = family.denoiser(pipe).dtype
            cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
            steered.control = controls
            with accelerator.autocast():
                output = family.forward(pipe, steered, noisy.to(dtype), t, cond)
            loss = F.mse_loss(output.float(), goal.float(), reduction="none").flatten(1).mean(1)
            if (weights := objectives.loss_weights(target, scheduler, t, timesteps)) is not None:
                loss = loss * weights.to(loss.device)
            loss = loss.mean()
            if not torch.isfinite(loss):
                raise GenkitError(f"loss became {loss.item()} at step {step + 1}; no weights were written and the last "
                                  f"checkpoint is untouched (lower train.learning_rate and {term('resume')})")
            accelerator.backward(loss)
            if accelerator.sync_gradients and processes > 1:  # DDP's average, without DDP's wrapper
                for p in params:
                    p.grad = accelerator.reduce(p.grad, "mean")
                loss = accelerator.reduce(loss.detach(), "mean")
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    loss, every = None, recipe.validation.every
    with shared.LossLog(out / "loss.jsonl", start, enabled=main) as log, progress_bar(
            range(start, cfg.steps), initial=start, total=cfg.steps, unit="step", desc="train controlnet",
            progress=progress and main) as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            loss = float(np.mean([one_pass(step, micro) for micro in range(cfg.gradient_accumulation_steps)]))
            done = step + 1
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate(step, cfg):.1e}")
            log.write(done, loss)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                _check_finite(params, done)
                accelerator.wait_for_everyone()
                if main:
                    opt_tensors, opt_meta = checkpoint.optimizer_tensors(optimizer)
                    checkpoint.save(out, done, {"controlnet": controlnet.state_dict(), "optimizer": opt_tensors},
                                    {**run_meta, "optimizer": opt_meta}, keep=cfg.keep_checkpoints)
            if main and every and (done % every == 0 or done == cfg.steps):
                controlnet.eval()
                _validate(pipeline, controlnet, samples, recipe,
                          out / "samples" / f"step-{done:07d}.png")
                controlnet.train()

    # 5. Export (the main process): the diffusers folder's files (each by an atomic rename) and the record
    accelerator.wait_for_everyone()
    result = ControlNetTrainResult(out=out, weights=out / WEIGHTS_NAME, record=out / RECORD_NAME, steps=cfg.steps,
                                   loss=loss)
    if not main:
        return result

    def write(tmp: Path) -> None:
        controlnet.save_pretrained(str(tmp), safe_serialization=True)

    staged = out / ".export"
    atomic_folder(staged, write)
    (staged / "config.json").replace(out / "config.json")
    (staged / WEIGHTS_NAME).replace(out / WEIGHTS_NAME)
    staged.rmdir()
    save_text(result.record, json.dumps({
        "kind": "controlnet", "base_model": model_name, "family": family.name, "steps": cfg.steps,
        "dataset": dataset, "data_dir": str(scan.data_dir), "images": scan.images, "items": len(items),
        "preprocessor": recipe.data.preprocessor, "resolution": recipe.data.resolution,
        "effective_batch_size": effective, "processes": processes,
        "recipe": to_dict(recipe), "loss": loss, "versions": versions(),
    }, indent=1))
    return result


def _resolution(pipeline, size: int) -> int:
    """data.resolution checked against the model's multiple; 0: the model's own size."""
    from genkit.checks import check_multiple

    if size == 0:
        return pipeline.family.default_size(pipeline.pipe)
    return check_multiple("data.resolution", size, pipeline.size_factor, f" for {pipeline.name}")


def _check_finite(params, step: int) -> None:
    if not all(torch.isfinite(p).all() for p in params):
        raise GenkitError(f"the ControlNet's weights are not finite at step {step}; nothing was written (lower "
                          "train.learning_rate)")
